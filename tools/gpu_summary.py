"""summary.md of a tools/gpu_suite.py run: what ran, how it ended, what is left to run, and the
headline figures read back from the results folder (bench JSONs, run metrics, junit reports)."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from common.atomic import ENCODING
from common.wording import counted
from engine.history import read_history, steady_seconds, time_spent
from tools.bench_names import epoch_name, overhead_text, peer_name, step_name

KINDS_LISTED = 5  # of the profile's kernel kinds, in the summary's line


def read_json(path: Path) -> dict:
    """A results file, or {} while it is not written yet (a step killed before its first save)."""
    try:
        return json.loads(path.read_text(encoding=ENCODING))
    except (OSError, ValueError):
        return {}


def tests_line(report: Path) -> list[str]:
    """pytest's counts from its junit report, and the names of the tests that failed."""
    try:
        suite = ElementTree.parse(report).getroot().find("testsuite")
    except (OSError, ElementTree.ParseError):
        return []
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return [f"- {report.stem}: {counts['tests']} tests, {counts['failures']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped"
            + (f" ({', '.join(failed)})" if failed else "")]


def compile_mode_of(r: dict) -> str:
    """A bench row's compile mode: rows written before the field was ran the default one."""
    return r.get("compile_mode", "default")


# each row's name, enough to tell it from the other rows of its section, as the bench names it
ROW_NAMES = {
    "loaders": lambda r: r["loader"],
    # epoch rows written before the field was did not autotune: they say so
    "epoch": lambda r: epoch_name(r["loader"], r["precision"], r["compile"], compile_mode_of(r),
                                  r["batch_size"],
                                  cudnn_benchmark=r.get("cudnn_benchmark", False)),
    "step": lambda r: step_name(r["precision"], r["memory_format"], r["compile"],
                                compile_mode_of(r), r["batch_size"]),
    "peers": lambda r: (peer_name(r["loader"], r["augment"], r["output"])
                        + (f" vs {r['versus']}" if r["versus"] else "")),
}

# a line for each measured row of these sections
ROW_LINES = {
    "loaders": lambda r: (f"loader {ROW_NAMES['loaders'](r)}: {r['images_per_s']:,.0f} "
                          f"images/s, {1e3 * r['images'] / r['images_per_s']:,.1f} ms per "
                          f"{r['images']:,}-image epoch"),
    "epoch": lambda r: (f"epoch, {ROW_NAMES['epoch'](r)}: {r['images'] / r['images_per_s']:.3f} "
                        f"s per {r['images']:,} images, data wait {r['data_wait_share']:.1%} "
                        f"(blocked in next()), loader overhead "
                        f"{overhead_text(r['loader_overhead_share'])} (over steps on a batch on "
                        "the device)"),
    "step": lambda r: f"step {ROW_NAMES['step'](r)}: {r['images_per_s']:,.0f} images/s",
}


def bench_lines(bench: dict) -> list[str]:
    """The figures the goals are about: loader epochs, training epochs with their data-wait
    share, the step grid, the peers' ratios and MFU; and every row that failed."""
    lines = [f"- {line(r)}" for section, line in ROW_LINES.items()
             for r in bench.get(section, []) if r.get("images_per_s")]
    peers = bench.get("peers", {})
    lines += [f"- peers: {ROW_NAMES['peers'](r)}: {r['ratio']:.2f}x"
              for r in peers.get("loaders", []) if r.get("ratio")]
    # the profiled epoch against the fastest timed one: what of it the device was busy
    lines += [f"- peers, profiled: {ROW_NAMES['peers'](r)}: device busy "
              f"{r['device_busy_ms']:.2f} ms of a {1e3 * r['images'] / r['images_per_s']:.2f} ms "
              f"epoch, {r['device_events']} device events"
              + (f", most time in {r['top_op']}" if r["top_op"] else "")
              for r in peers.get("loaders", [])
              if r.get("device_busy_ms") is not None and r.get("images_per_s")]
    lines += [f"- peers: {r['pipeline']} pipeline epoch {r['images_per_s']:,.0f} images/s, "
              f"{r['vs_seed']:.2f}x seed" for r in peers.get("epochs", [])]
    lines += [f"- MFU {r['config']}: {r['mfu']:.1%} of {r['peak_flops_per_s'] / 1e12:.3g} "
              "TFLOP/s" for r in bench.get("mfu", {}).get("rows", []) if r["mfu"] is not None]
    lines += [f"- no {dtype} MFU: a {dtype} run outpaced the {dtype} matmul peak"
              for dtype in bench.get("mfu", {}).get("not_peaks", [])]
    profile = bench.get("profile", {})
    if profile.get("device_busy_share") is not None:
        name = epoch_name(profile["loader"], profile["precision"], profile["compile"],
                          compile_mode_of(profile), profile["batch_size"])
        lines.append(f"- profile, {name}: device busy "
                     f"{profile['device_busy_ms']:.2f} ms of a {profile['step_ms']:.2f} ms step "
                     f"({profile['device_busy_share']:.0%})")
    if profile.get("kernel_kinds"):  # the kinds that hold most of the kernels' time
        lines.append("- profile, kernel time per step: " + ", ".join(
            f"{k['kind']} {k['ms']:.2f} ms ({k['share']:.0%})"
            for k in profile["kernel_kinds"][:KINDS_LISTED]))
    rows = [(section, r) for section in ROW_LINES for r in bench.get(section, [])]
    rows += [("peers", r) for r in peers.get("loaders", [])]
    lines += [f"- {section} {ROW_NAMES[section](r)}: {r['status']}, {r['reason']}"
              for section, r in rows if r.get("status", "ok") != "ok"]
    if "epochs_failed" in peers:
        lines.append(f"- peers: seed vs default epochs failed: {peers['epochs_failed']}")
    return lines


def run_line(folder: Path, seconds: float | None) -> list[str]:
    """A training run: epochs, wall time of its command and the training and evaluation in it
    (the rest: start, building the run, waiting for checkpoints, exit), its steady epoch
    seconds (engine.history.steady_seconds), last accuracy."""
    try:
        rows = read_history(folder)
    except (OSError, ValueError):
        return []
    if not rows:
        return []
    wall = f" in {seconds:,.0f} s wall" if seconds is not None else ""
    spent = (f" ({time_spent(rows):.1f} s of training, "
             f"{time_spent(rows, 'eval_seconds'):.1f} s of evaluation)")
    steady = (f"median after the first; first {rows[0]['seconds']:.1f} s" if len(rows) > 1
              else "its one epoch, warm-up included")
    return [f"- {folder.name}: {counted(len(rows), 'epoch')}{wall}{spent}, "
            f"{steady_seconds(rows):.2f} s per training epoch ({steady}), test accuracy "
            f"{rows[-1]['test_acc']:.2%}"]


def figures(record: dict, results: Path) -> list[str]:
    """Every headline figure found in the results folder, a line each."""
    seconds = {c["name"]: c.get("seconds") for step in record["steps"]
               for c in step["commands"]}
    lines = []
    for name in seconds:
        lines += tests_line(results / f"{name}.xml")
        lines += bench_lines(read_json(results / f"{name}.json"))
        lines += run_line(results / name, seconds[name])
    return lines


def render(record: dict, results: Path, finished: bool) -> str:
    """The summary as Markdown: header, a row per command, what did not run (`finished`: the
    suite has ended, and the budget left them out; else they are still to come), the figures."""
    meta = record["meta"]
    lines = [f"# GPU suite on {meta.get('device_name')}, commit {meta.get('commit')}, "
             f"{meta.get('date')}", "", f"`{meta.get('command')}`", "",
             "| step | command | status | seconds |", "| --- | --- | --- | --- |"]
    for step in record["steps"]:
        lines += [f"| {step['step']} | {c['name']} | {c['status']} | {c.get('seconds', '')} |"
                  for c in step["commands"]]
    why = "not run: the budget was spent" if finished else "not reached yet"
    lines += [f"| {step} | | {why} | |" for step in record["not_run"]]
    left = [s["step"] for s in record["steps"] if not s["ok"]] + record["not_run"]
    if left:
        lines += ["", f"Still to run: `bash tools/gpu_suite.sh {shlex.join(left)}`"]
    lines += ["", "## Figures", "", *(figures(record, results) or ["(none yet)"])]
    return "\n".join(lines) + "\n"

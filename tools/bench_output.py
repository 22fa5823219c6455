"""What tools/bench.py prints and saves: where it ran (device, versions, commit) and a table
per section, its columns the fields of the section's result dataclass."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from dataclasses import asdict, fields
from importlib.metadata import version

import torch

from common.hardware import available_cores, device_name
from tools import ROOT
from tools.bench_names import epoch_name
from tools.bench_peers import PeerResult, SeedEpochResult
from tools.bench_sections import EpochResult, LoaderResult, StepResult

COLUMNS = {name: [f.name for f in fields(cls)] for name, cls in
           (("loaders", LoaderResult), ("step", StepResult), ("epoch", EpochResult),
            ("peers", PeerResult), ("seed", SeedEpochResult))}
COLUMNS["mfu"] = ["source", "config", "images_per_s", "achieved_TFLOP/s", "peak_TFLOP/s", "mfu"]
NAME_WIDTH = 100  # the profile table's op names, cut to this (its JSON keeps them whole)
LISTED = 6  # numbers a table cell lists; more (a turn's repeats of a fast loader's epoch, up
# to 32 on a GPU) as their count and range, where the line ran to hundreds of characters


def commit() -> str:
    """HEAD's hash, with '-dirty' when a tracked file differs from it (untracked ones, such as
    the log this run is writing, do not count); in a copy without .git (a GPU machine's),
    $GPU_SUITE_COMMIT, the hash the copy was made from."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GPU_SUITE_COMMIT") or "unknown (not a git checkout)"


def metadata(device: torch.device, argv: list[str]) -> dict:
    """What ran where: device, library versions, commit, command line, date, and the load
    average at the start (1, 5, 15 minutes): on a shared host, what tells a quiet run."""
    return dict(
        command=shlex.join(["python", "tools/bench.py", *argv]), argv=argv, commit=commit(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device.type, device_name=device_name(device), cores=available_cores(),
        load_average=[round(load, 2) for load in os.getloadavg()],
        torch=str(torch.__version__),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch_cuda_build=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        accelerate=version("accelerate"), ffcv=version("ffcv"),  # ffcv.__version__ is stale
        python=platform.python_version())


def number(value: object) -> str:
    """A cell of a table: a float with thousands separators from 100, 3 significant digits
    below; an integer (a count, a batch size) as it is; a long list as its count and range."""
    if isinstance(value, list):
        if len(value) > LISTED:  # the JSON keeps them all
            return f"{len(value)}: {number(min(value))}..{number(max(value))}"
        return " ".join(number(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def shortened(name: str) -> str:
    """A name cut to NAME_WIDTH characters for a table (a cuDNN kernel's runs to 1,600); the
    JSON keeps it whole."""
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def table(title: str, rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of the given keys of rows."""
    cells = [columns] + [[number(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([f"\n== {title}", *lines])


def report(results: dict) -> str:
    """Every section as a table, the peaks and the MFU formula under the MFU table."""
    parts = [table(name, [asdict(r) for r in results[name]], COLUMNS[name])
             for name in ("loaders", "step", "epoch") if name in results]
    if "peers" in results:
        p = results["peers"]
        parts.insert(1 if "loaders" in results else 0, "\n".join([
            table("peers: loaders (ratio = ours / versus, same augmentations and dtype; "
                  "output: what each hands over)",
                  [asdict(r) for r in p["loaders"]], COLUMNS["peers"]),
            table("peers: training epoch, seed notebook's pipeline vs the default preset",
                  [asdict(r) for r in p["epochs"]], COLUMNS["seed"]),
            *([f"failed: {p['epochs_failed']}"] if "epochs_failed" in p else [])]))
    if "mfu" in results:
        m = results["mfu"]
        rows = [{**r, "achieved_TFLOP/s": r["achieved_flops_per_s"] / 1e12,
                 "peak_TFLOP/s": r["peak_flops_per_s"] / 1e12} for r in m.rows]
        parts.append(table("mfu", rows, COLUMNS["mfu"]))
        parts.append(f"{m.formula}: {m.train_flops_per_image:,} training FLOPs per image "
                     f"(hand count {m.hand_count_flops_per_image:,} from {m.macs_per_image:,} "
                     f"forward MACs)")
        parts += [f"{p.dtype} peak: {p.flops_per_s / 1e12:.3f} TFLOP/s ({p.size}^3 {p.math} "
                  f"matmul, fastest of {len(p.block_s)} blocks of {p.reps})"
                  for p in m.peaks.values()]
        parts += [f"no {dtype} MFU: a {dtype} run computed faster than the {dtype} matmul, so "
                  f"that matmul is not this device's peak" for dtype in m.not_peaks]
    if "profile" in results:
        r = results["profile"]
        where = r.sort_by.removeprefix("self_")
        name = epoch_name(r.loader, r.precision, r.compile, r.compile_mode, r.batch_size)
        parts.append(table(f"profile: {r.steps} steps after {r.warmup_steps} warm-up, {name}, "
                           f"width {r.width}; ops by {r.sort_by}",
                           [{**op, "name": shortened(op["name"])} for op in r.ops],
                           ["name", "calls", r.sort_by, where]))
        if r.device_busy_ms is not None:
            parts.append(f"device busy {r.device_busy_ms:.2f} ms per step (profiled) of a "
                         f"{r.step_ms:.2f} ms step (not profiled): {r.device_busy_share:.0%}; "
                         "the rest of the step the device waited for the host")
        if r.kernel_kinds:
            parts.append(table("profile: kernels by kind (by their names), per step",
                               r.kernel_kinds, ["kind", "kernels", "ms", "share"]))
        if r.trace:
            parts.append(f"trace: {r.trace}")
    return "\n".join(parts)


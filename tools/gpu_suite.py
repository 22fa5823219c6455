"""`bash tools/gpu_suite.sh [STEP ...]` (or `make gpu STEP=...`): the GPU validation in steps.

The steps run in the order given, every log and JSON written to one results folder.

Steps, in the order `all` runs them (most wanted first, so a short lease measures what matters):
tests-quick (pytest -m "gpu and not slow"), train (the seed pipeline, then the fast preset
compiled, on 50k synthetic images: the headline ratio), bench-peers (the public loaders and the
seed pipeline's epoch beside ours), bench-epoch (loaders, 50k-image epochs per loader, MFU, a
profile), tests-e2e (pytest -m "gpu and slow", on several workers), train-eager (the fast
preset not compiled), profile-ffcv (bench-epoch's profile, its steps fed by the ffcv loader),
bench-step (the precision x format x compile x batch grid). Each step has a time limit, so one
slow step cannot take the lease from the ones after it. --budget ends the whole run in time: a
command is killed at it and later steps are recorded as not run.
--bundle packs the results into one .tar.gz after every command (for machines that hand back
few files). --dry-run runs the same commands on the CPU with tiny sizes. On a machine without
ffcv or grad-cam, the wheels in the checkout's .whl/ (tools/wheelhouse.sh) are installed first.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import CommandParser, path_option, run_main
from common.errors import SetupError
from common.files import atomic_write, place_problem, write_json, write_text
from tools.gpu_summary import render

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests-quick", "train", "bench-peers", "bench-epoch", "tests-e2e", "train-eager",
         "profile-ffcv", "bench-step")
GROUPS = {"all": STEPS, "tests": ("tests-quick", "tests-e2e"),
          "bench": ("bench-peers", "bench-epoch", "profile-ffcv", "bench-step")}
STEP_LIMIT_S = 530  # every step ends (its command killed) before 9 minutes
# the first steps' own limits, in whole minutes at 1.6x or more of their times on the first H200
# run (52, 106, 97 and 111 s: benchmarks/results/h200-2026-12-04/): a hang in the quick tests,
# or a step slower on another GPU, leaves the next steps of a 9-minute lease their turn.
# bench-epoch's is a minute more: its epochs now compile in two modes (CUDA graphs, default);
# profile-ffcv's, not run yet, is an estimate (a process, FFCV's numba JIT, a compile, 43 steps)
LIMITS = {"tests-quick": 120, "train": 180, "bench-peers": 180, "bench-epoch": 240,
          "profile-ffcv": 120}
START_MIN_S = 30  # a command is not started with less of the budget left
RESERVE_S = 10  # of the budget, kept for the summary and the last bundle
STOP_WAIT_S = 30  # a command Ctrl-C reached gets this long to save and stop
NEEDED = ("ffcv", "pytorch_grad_cam")  # what a bare GPU image lacks; the wheels provide them
TEST_WORKERS, TEST_CORES = 4, 4  # tests-e2e on 16 cores: 4 workers of 4 cores each
EPOCHS = 24  # the fast preset's (1 in a dry run); GPU_SUITE_EPOCHS=N sets N instead

# the header of every log: tools/bench_output.metadata, in the environment the steps run in
# (and /dev/shm's size: the torchvision DataLoader's workers pass batches through it, and a
# container's small default would end them in a bus error)
HEADER = ("import json, os, shutil, sys, torch; from importlib.metadata import version; "
          "from tools.bench_output import metadata; "
          "m = metadata(torch.device(sys.argv[1]), []); "
          "m.update({p: version(p) for p in ('numba', 'grad-cam', 'pytest')}); "
          "m['dev_shm_bytes'] = shutil.disk_usage('/dev/shm').total "
          "if os.path.isdir('/dev/shm') else None; "
          "print(json.dumps(m))")


@dataclass
class Suite:
    """Where a suite writes, how its commands run, its deadline, and whether it is a dry run."""

    results: Path
    work: Path  # data and run folders: large, so kept out of the results
    python: str
    env: dict
    dry: bool
    meta: dict  # the header of every log
    steps: list[str]  # what this run was asked for, in order
    deadline: float = math.inf  # time.monotonic() at which --budget runs out
    bundle: Path | None = None
    done: list[dict] = field(default_factory=list)  # one record per step run so far

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def budget_left(self) -> float:
        """Seconds of --budget left for commands (RESERVE_S kept for the last save)."""
        return self.deadline - RESERVE_S - time.monotonic()

    def script(self, path: str, *args: str) -> list[str]:
        """The argv of a repository script run with the suite's Python, from any directory."""
        return [self.python, str(ROOT / path), *args]


# --- the steps: named commands ----------------------------------------------------------


# a step's commands, in order: (name, argv) each
Commands = list[tuple[str, list[str]]]
# the modules holding tests marked gpu (named, not searched for: a bare GPU machine lacks the
# packages other test modules import, such as onnxruntime)
GPU_TESTS = ("test_gpu.py", "test_predict.py")


def pytest_step(s: Suite, name: str, marks: str, workers: int = 1) -> Commands:
    """pytest on the tests of `marks` in GPU_TESTS (skipped, not run, in a dry run on the
    CPU); verbose, with each failure's traceback printed when it fails, so a command killed at
    its limit still shows which tests passed and why the others failed. On one worker each
    test's seconds are on its line; on several (pytest-xdist) that style prints no true times,
    so they come from --durations and the junit report."""
    spread = ["-n", str(workers)] if workers > 1 else ["-o", "console_output_style=times"]
    return [(name, [s.python, "-m", "pytest", "-v", "-m", marks, "-p", "no:cacheprovider",
                    "-p", "tests.failures_at_once", *spread, "--durations", "0",
                    "--junitxml", str(s.results / f"{name}.xml"),
                    *(str(ROOT / "tests" / f) for f in GPU_TESTS)])]


def end_to_end_tests(s: Suite) -> Commands:
    """The slow GPU tests, runs of the commands end to end: spread over test_workers (in a
    row, the first H200 run's budget cut them at the 9th of 10, after 233 s), then those
    marked gpu_alone one at a time, as they fill the GPU's memory or time it."""
    workers = test_workers(s.python, s.env)
    return [*pytest_step(s, "tests-e2e", "gpu and slow and not gpu_alone", workers),
            *pytest_step(s, "tests-e2e-alone", "gpu and slow and gpu_alone")]


def test_workers(python: str, env: dict) -> int:
    """pytest-xdist workers for the end-to-end tests: one per TEST_CORES cores, at most
    TEST_WORKERS (each runs subprocesses with loader threads of their own), or 1 where `python`
    lacks pytest-xdist."""
    if missing(python, env, ("xdist",)):
        return 1
    return max(1, min(TEST_WORKERS, len(os.sched_getaffinity(0)) // TEST_CORES))


def bench(s: Suite, name: str, sections: str, *options: str) -> Commands:
    """One tools/bench.py run of `sections` with its JSON in the results: its defaults for
    CUDA but `options`, or --quick in a dry run."""
    return [(name, s.script("tools/bench.py", "--device", s.device, "--sections", sections,
                            "--data-dir", str(s.work / "data"),
                            "--json", str(s.results / f"{name}.json"), *options,
                            *(["--quick"] if s.dry else [])))]


def train_commands(s: Suite, *names: str) -> Commands:
    """engine/train.py runs by name: the fast preset compiled or eager, or the seed notebook's
    pipeline; on 50k synthetic images (tiny ones in a dry run)."""
    epochs = os.environ.get("GPU_SUITE_EPOCHS", "1" if s.dry else str(EPOCHS))
    data = ["--dataset", "synthetic", "--data-dir", str(s.work / "data")]
    if s.dry:
        data += ["--synthetic-size", "256", "64", "--width", "8"]
    compile = [] if s.dry else ["--compile"]  # CUDA's default, said explicitly
    runs = {"train-fast-compile": ["--epochs", epochs, *compile],
            "train-seed": ["--preset", "seed", "--loader", "torchvision", "--precision",
                           "fp32", "--no-compile", "--no-channels-last", "--epochs", "2"],
            "train-fast-eager": ["--epochs", epochs, "--no-compile"]}
    return [(name, s.script("engine/train.py", *data, *runs[name], "--out", str(s.work / name)))
            for name in names]


COMMANDS = {
    "tests-quick": lambda s: pytest_step(s, "tests-quick", "gpu and not slow"),
    # loaders over 50k images, a 50k-image epoch per loader with its data-wait share, the MFU
    # of each, and a profile (with its trace) of the default run's steps
    "bench-epoch": lambda s: bench(s, "bench-epoch", "loaders,epoch,mfu,profile"),
    # the headline: the seed pipeline, then the default preset compiled, on the same GPU; the
    # short, fixed seed run first, so a compiled run cut by the step's limit leaves it measured
    "train": lambda s: train_commands(s, "train-seed", "train-fast-compile"),
    "tests-e2e": end_to_end_tests,
    # airbench's loader, stock FFCV and the seed DataLoader beside ours over 50k images (and a
    # profiled epoch of each: the device's busy time), then a 50k-image training epoch of the
    # seed pipeline beside the default preset, with the MFU
    "bench-peers": lambda s: bench(s, "bench-peers", "peers,mfu"),
    "train-eager": lambda s: train_commands(s, "train-fast-eager"),
    # the profile of bench-epoch, its steps fed by the ffcv loader: the first H200 run's ffcv
    # epoch waited for data 13.3% of its time (goal: under 2%), not explained yet
    "profile-ffcv": lambda s: bench(s, "profile-ffcv", "profile", "--profile-loader", "ffcv"),
    # every precision x format x compile at batch 512, then batch 256 and 1024 (compiled), all on
    # CUDA graphs (the engine's mode), then torch.compile's default mode: 9 of its 15
    # configurations compile; the JSON is rewritten after each one
    "bench-step": lambda s: bench(s, "bench-step", "step,mfu"),
}


# --- the environment -------------------------------------------------------------------


def missing(python: str, env: dict, names: tuple[str, ...]) -> dict[str, str]:
    """Which of `names` `python` cannot import with `env`, each with its error's last line."""
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as error:\n"
            "        last = (str(error).splitlines() or [''])[-1]\n"
            "        print(name, type(error).__name__ + ':', last)")
    result = subprocess.run([python, "-c", code], env=env, cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SetupError(f"{python} cannot run: {result.stderr.strip()[-500:]}")
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def environment(python: str, site: Path) -> dict:
    """The steps' environment: the checkout on PYTHONPATH, and the .whl/ wheels installed into
    `site` (and put first on it) when ffcv or grad-cam cannot be imported otherwise; .whl/lib
    (tools/wheelhouse.sh) goes on LD_LIBRARY_PATH if ffcv still cannot load its libraries."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    paths.insert(0, str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    lacking = missing(python, env, NEEDED)
    if not lacking:
        return env
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise SetupError(f"{python} cannot import {', '.join(lacking)} and {ROOT / '.whl'} "
                         "holds no wheels. Run `make setup` (a .venv with everything), or build "
                         "the wheels with `make wheels` on a machine with network and copy .whl/ "
                         "into this checkout.")
    print(f"installing {len(wheels)} wheels from .whl/ into {site}", flush=True)
    # --upgrade: a second suite on the same machine replaces the wheels a first one installed
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                              "--upgrade", "--target", str(site), *map(str, wheels)],
                             capture_output=True, text=True)
    if install.returncode != 0:
        raise SetupError(f"pip could not install the wheels of .whl/ into {site}: "
                         f"{install.stderr.strip()[-800:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
    lacking = missing(python, env, NEEDED)
    libs = ROOT / ".whl" / "lib"
    if libs.is_dir() and any(".so" in error for error in lacking.values()):
        # an image without X11: the libraries that ffcv's bundled libGLX needs, carried
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (env.get("LD_LIBRARY_PATH"), str(libs)) if p)
        print(f"adding {libs} to LD_LIBRARY_PATH: {'; '.join(lacking.values())}", flush=True)
        lacking = missing(python, env, NEEDED)
    if lacking:
        why = "; ".join(f"{name}: {error}" for name, error in lacking.items())
        raise SetupError(f"after installing .whl/ into {site}, {python} still cannot import "
                         f"{why}. Install what is named, or rebuild the wheels for this Python "
                         "with `make wheels`.")
    return env


def header(python: str, env: dict, device: str, argv: list[str], dry: bool) -> dict:
    """What ran where, read once: tools/bench_output.metadata of the device, plus the suite's
    own (the commit comes from git, else from $GPU_SUITE_COMMIT for a copy without .git)."""
    result = subprocess.run([python, "-c", HEADER, device], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"cannot read the device and library versions with {python}: "
                         f"{result.stderr.strip()[-800:]}")
    meta = json.loads(result.stdout.splitlines()[-1])
    meta.update(command=shlex.join(["bash", "tools/gpu_suite.sh", *argv]), argv=argv,
                dry_run=dry, pythonpath=env["PYTHONPATH"])
    return meta


# --- running a step ----------------------------------------------------------------------


def run_command(argv: list[str], env: dict, log, timeout: float) -> tuple[int | None, float]:
    """argv with its output appended to `log`; (return code or None when killed at timeout,
    seconds). The command runs in its own process group so a timeout ends its children too; in
    the suite's session, not a new one, so that whatever ends the suite's session (the device
    machine's call returning) ends a command still running as well."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=os.setpgrp)  # safe: the suite starts no threads
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # it would not stop: the suite must still end
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return code, time.perf_counter() - start


def clear_outputs(s: Suite, names: list[str]) -> None:
    """Remove what earlier suites left in the results for these commands (a run's files, a
    bench JSON and trace, a junit report): the summary reads the folder, and would show an
    old run's figures beside a command that failed this time."""
    for name in names:
        shutil.rmtree(s.results / name, ignore_errors=True)
        for suffix in (".json", ".trace.json.gz", ".xml"):
            (s.results / f"{name}{suffix}").unlink(missing_ok=True)


def keep_run(s: Suite, name: str) -> None:
    """Copy a training run's small files (not its checkpoints) into the results."""
    run = s.work / name
    if run.is_dir():
        (s.results / name).mkdir(exist_ok=True)
        for file in ("config.json", "metrics.jsonl", "metrics.csv"):
            if (run / file).exists():
                shutil.copy2(run / file, s.results / name / file)


def save(s: Suite) -> None:
    """The suite's record as it stands (suite.json, summary.md) and, with --bundle, the whole
    results folder packed anew, with the summary beside it: called after every command, so a
    run cut short keeps everything up to its last command."""
    record = dict(meta=s.meta, steps=s.done,
                  not_run=[step for step in s.steps if step not in {d["step"] for d in s.done}])
    write_json(s.results / "suite.json", record)
    summary = render(record, s.results)
    write_text(s.results / "summary.md", summary)
    if s.bundle is not None:
        def pack(tmp: Path) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(s.results, arcname=s.bundle.name.removesuffix(".tar.gz"))

        atomic_write(s.bundle, pack)
        write_text(summary_path(s.bundle), summary)


def summary_path(bundle: Path) -> Path:
    """summary.md beside a bundle: gpu-suite.tar.gz -> gpu-suite.summary.md."""
    return bundle.with_name(bundle.name.removesuffix(".tar.gz") + ".summary.md")


def run_step(s: Suite, step: str) -> bool:
    """One step: its log (header, then every command's output) and its record in s.done; True
    if every command succeeded within the step's limit and the budget."""
    meta = dict(s.meta, step=step)
    commands = COMMANDS[step](s)
    step_end = time.monotonic() + LIMITS.get(step, STEP_LIMIT_S)
    done = []
    record = dict(step=step, ok=False, commands=done)
    s.done.append(record)
    log_path = s.results / f"{step}.log"
    clear_outputs(s, [name for name, _ in commands])
    cut = "the --budget"  # what stopped the step, should a command not start
    with open(log_path, "w") as log:
        log.writelines(f"# {key}: {value}\n" for key, value in meta.items())
        for name, argv in commands:
            step_left = step_end - time.monotonic()
            budget_left = s.budget_left()
            if min(step_left, budget_left) < START_MIN_S:  # it would be killed before its end
                cut = "the --budget" if budget_left <= step_left else "its step limit"
                break
            left = min(step_left, budget_left)
            print(f"{step}: {name} (at most {left:.0f} s)", flush=True)
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            code, seconds = run_command(argv, s.env, log, left)
            limit = "the budget" if budget_left <= step_left else "the step limit"
            status = ("ok" if code == 0 else f"exit {code}" if code is not None
                      else f"killed at {limit}")
            log.write(f"# {name}: {status}, {seconds:.1f} s\n")
            log.flush()
            keep_run(s, name)
            done.append(dict(name=name, argv=argv, status=status, returncode=code,
                             seconds=round(seconds, 1)))
            save(s)
            if code is None:  # killed at a limit: no time is left for the next one
                break
    done += [dict(name=name, argv=argv, status="not run") for name, argv in commands[len(done):]]
    record["ok"] = len(done) == len(commands) and all(c["status"] == "ok" for c in done)
    write_json(s.results / f"{step}.summary.json", dict(meta=meta, **record))
    save(s)
    if any(c["status"] not in ("ok", "not run", "killed at the budget") for c in done):
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        print(f"{step}: FAILED; the whole log is {log_path}", file=sys.stderr)
    elif not record["ok"]:
        print(f"{step}: cut short by {cut}; the log is {log_path}", file=sys.stderr)
    else:
        print(f"{step}: ok ({sum(c['seconds'] for c in done):.0f} s), log {log_path}")
    return record["ok"]


def run_steps(s: Suite) -> list[str]:
    """Each step in order, while the budget lasts; the steps that failed or did not run."""
    failed = []
    for step in s.steps:
        if s.budget_left() < START_MIN_S:
            print(f"{step}: not run, the --budget is spent", file=sys.stderr)
            failed.append(step)
        elif not run_step(s, step):
            failed.append(step)
    save(s)
    return failed


# --- the command line --------------------------------------------------------------------


def outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The results folder and the bundle. With $OUT set (a machine that hands back a few files
    of one folder) and no --results, the folder is a new temporary one and the bundle
    $OUT/gpu-suite.tar.gz; otherwise the folder is --results, else
    benchmarks/results/gpu-<date>/."""
    out = os.environ.get("OUT")
    bundle = args.bundle or (Path(out) / "gpu-suite.tar.gz" if out else None)
    if bundle is not None:  # found now, not after the first command
        bundle = bundle.absolute()
        problem = "it is a folder" if bundle.is_dir() else place_problem(bundle)
        if problem:
            raise SetupError(f"--bundle {bundle}" + (" (from $OUT)" if args.bundle is None else "")
                             + f": {problem}; name a .tar.gz file in a writable folder.")
    if args.results is not None:
        return args.results.absolute(), bundle
    if out:  # a fresh folder: a second call on the same machine bundles nothing stale
        return Path(tempfile.mkdtemp(prefix="gpu-suite-results-")), bundle
    return ROOT / "benchmarks" / "results" / f"gpu-{datetime.date.today().isoformat()}", bundle


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The suite's options, checked: a bad step name, --budget or --bundle is a usage error."""
    p = CommandParser(prog="bash tools/gpu_suite.sh", description=__doc__.split("\n")[0])
    p.add_argument("steps", nargs="*", default=["all"], metavar="STEP",
                   help=f"any of {', '.join(STEPS)}, or the groups {', '.join(GROUPS)} "
                        "(default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every command on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="end the whole run within this many seconds (wheel install included): "
                        "a command still running then is killed, later steps are not run")
    p.add_argument("--results", type=path_option("write the results into the current folder"),
                   help="default: a temporary folder when $OUT is set, else "
                        "benchmarks/results/gpu-<date>/")
    p.add_argument("--bundle", type=Path, metavar="FILE.tar.gz",
                   help="pack the results folder into this file after every command, with "
                        "FILE.summary.md beside it (default: $OUT/gpu-suite.tar.gz when $OUT "
                        "is set)")
    p.add_argument("--site", type=path_option("install the wheels into the current folder"),
                   default=Path(tempfile.gettempdir()) / "site",
                   help="where the .whl/ wheels are installed when needed (default: /tmp/site)")
    p.add_argument("--work", type=path_option("put the data and runs in the current folder"),
                   help="data and run folders (default: a temporary one)")
    args = p.parse_args(argv)
    unknown = [step for step in args.steps if step not in STEPS and step not in GROUPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}, "
                f"{', '.join(GROUPS)}")
    if args.budget is not None and not 0 < args.budget < math.inf:  # nan meant no budget
        p.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if args.bundle is not None and not args.bundle.name.endswith(".tar.gz"):
        p.error(f"--bundle {args.bundle}: name a .tar.gz file")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen steps; exit 1 if any failed or did not run."""
    start = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    steps = list(dict.fromkeys(s for name in args.steps for s in GROUPS.get(name, (name,))))

    def body() -> int:
        if not args.dry_run and importlib.util.find_spec("torch") is not None:
            import torch

            if not torch.cuda.is_available():
                raise SetupError("torch sees no CUDA GPU here; run on a GPU machine, or check "
                                 "the commands on the CPU with --dry-run.")
        results, bundle = outputs(args)
        results.mkdir(parents=True, exist_ok=True)
        env = environment(sys.executable, args.site.absolute())
        device = "cpu" if args.dry_run else "cuda"
        meta = header(sys.executable, env, device, argv, args.dry_run)
        deadline = start + args.budget if args.budget else math.inf
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            # absolute: the commands run in the checkout, the caller named them from elsewhere
            work = args.work.absolute() if args.work else Path(tmp)
            suite = Suite(results, work, sys.executable, env, args.dry_run,
                          meta, steps, deadline, bundle)
            failed = run_steps(suite)
        print((results / "summary.md").read_text())
        print(f"results in {results}" + (f", packed into {bundle}" if bundle else ""))
        if failed:
            print(f"failed or not run: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

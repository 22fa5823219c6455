"""`bash tools/gpu_suite.sh [STEP ...]` (or `make gpu STEP=...`): the GPU validation in steps.

The steps (tools/gpu_steps.py) run in the order given, every log and JSON written to one results
folder. Each step has a time limit, so one slow step cannot take the lease from the ones after
it. --budget ends the whole run in time: a command is killed at it and later steps are recorded
as not run. --bundle packs the results into one .tar.gz after every command (for machines that
hand back few files). --dry-run runs the same commands on the CPU with tiny sizes. On a machine
without ffcv or grad-cam, the wheels in the checkout's .whl/ (tools/wheelhouse.sh) are installed
first (tools/gpu_environment.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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
from pathlib import Path

from common.atomic import ENCODING, atomic_write, write_json, write_text
from common.cli import CommandParser, path_option, run_main, summary
from common.errors import SetupError
from common.output_folders import make_dir
from common.paths import not_a_file, place_problem
from common.streams import error_line, say
from tools import ROOT
from tools.gpu_environment import environment, header
from tools.gpu_steps import COMMANDS, GROUPS, LIMITS, STEP_LIMIT_S, STEPS, Suite, suite_device
from tools.gpu_summary import render

START_MIN_S = 30  # a command is not started with less of the budget left
RESERVE_S = 10  # of the budget, kept for the summary and the last bundle
STOP_WAIT_S = 30  # a command Ctrl-C reached gets this long to save and stop


def budget_left(s: Suite) -> float:
    """Seconds of --budget left for commands (RESERVE_S kept for the last save)."""
    return s.deadline - RESERVE_S - time.monotonic()


# --- running a step ----------------------------------------------------------------------


# the command's own process group, set by the child between fork and exec: with no Python run
# there from 3.11 on (preexec_fn is unsafe once threads exist, and CUDA's driver starts some)
OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def run_command(argv: list[str], env: dict, log, timeout: float) -> tuple[int | None, float]:
    """argv with its output appended to `log`; (return code or None when killed at timeout,
    seconds). The command runs in its own process group so a timeout ends its children too; in
    the suite's session, not a new one, so that whatever ends the suite's session (the device
    machine's call returning) ends a command still running as well."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            **OWN_GROUP)
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


def save(s: Suite, finished: bool = False) -> None:
    """The suite's record as it stands (suite.json, summary.md) and, with --bundle, the whole
    results folder packed anew, with the summary beside it: called after every command, so a
    run cut short keeps everything up to its last command; `finished` once no step is left to
    start (the steps not run then are the budget's)."""
    record = dict(meta=s.meta, steps=s.done,
                  not_run=[step for step in s.steps if step not in {d["step"] for d in s.done}])
    write_json(s.results / "suite.json", record)
    summary_md = render(record, s.results, finished)
    write_text(s.results / "summary.md", summary_md)
    if s.bundle is not None:
        def pack(tmp: Path) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(s.results, arcname=s.bundle.name.removesuffix(".tar.gz"))

        atomic_write(s.bundle, pack)
        write_text(summary_path(s.bundle), summary_md)


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
    with open(log_path, "w", encoding=ENCODING) as log:
        log.writelines(f"# {key}: {value}\n" for key, value in meta.items())
        for name, argv in commands:
            step_left = step_end - time.monotonic()
            budget = budget_left(s)
            by_budget = budget <= step_left  # which of the two ends the command, if any
            left = min(step_left, budget)
            if left < START_MIN_S:  # it would be killed before its end
                cut = "the --budget" if by_budget else "its step limit"
                break
            say(f"{step}: {name} (at most {left:.0f} s)")
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            code, seconds = run_command(argv, s.env, log, left)
            limit = "the budget" if by_budget else "the step limit"
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
    record["ok"] = all(c["status"] == "ok" for c in done)  # a command not run is not ok
    write_json(s.results / f"{step}.summary.json", dict(meta=meta, **record))
    save(s)
    if any(c["status"] not in ("ok", "not run", "killed at the budget") for c in done):
        tail = log_path.read_text(encoding=ENCODING).splitlines()[-25:]
        error_line("\n".join(tail))
        error_line(f"{step}: FAILED; the whole log is {log_path}")
    elif not record["ok"]:
        error_line(f"{step}: cut short by {cut}; the log is {log_path}")
    else:
        say(f"{step}: ok ({sum(c['seconds'] for c in done):.0f} s), log {log_path}")
    return record["ok"]


def run_steps(s: Suite) -> list[str]:
    """Each step in order, while the budget lasts; the steps that failed or did not run."""
    failed = []
    for step in s.steps:
        if budget_left(s) < START_MIN_S:
            error_line(f"{step}: not run, the --budget is spent")
            failed.append(step)
        elif not run_step(s, step):
            failed.append(step)
    save(s, finished=True)
    return failed


# --- the command line --------------------------------------------------------------------


def outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The results folder and the bundle. With $OUT set (a machine that hands back a few files
    of one folder) and no --results, the folder is a new temporary one and the bundle
    $OUT/gpu-suite.tar.gz; otherwise the folder is --results, else a temporary one for a dry
    run (its CPU figures must not land beside a GPU's, where `git add` would take them), else
    benchmarks/results/gpu-<date>/."""
    out = os.environ.get("OUT")
    bundle = args.bundle or (Path(out) / "gpu-suite.tar.gz" if out else None)
    if bundle is not None:  # found now, not after the first command
        bundle = bundle.absolute()
        problem = not_a_file(bundle)
        problem = f"it {problem}" if problem else place_problem(bundle)
        if problem:
            raise SetupError(f"--bundle {bundle}" + (" (from $OUT)" if args.bundle is None else "")
                             + f": {problem}; name a .tar.gz file in a writable folder.")
    if args.results is not None:
        return args.results.absolute(), bundle
    if out or args.dry_run:  # fresh: a second call on one machine bundles nothing stale
        return Path(tempfile.mkdtemp(prefix="gpu-suite-results-")), bundle
    return ROOT / "benchmarks" / "results" / f"gpu-{datetime.date.today().isoformat()}", bundle


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The suite's options, checked: a bad step name, --budget or --bundle is a usage error."""
    p = CommandParser(prog="bash tools/gpu_suite.sh", description=summary(__doc__))
    p.add_argument("steps", nargs="*", default=["all"], metavar="STEP",
                   help=f"any of {', '.join(STEPS)}, or the groups {', '.join(GROUPS)} "
                        "(default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every command on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="end the whole run within this many seconds (wheel install included): "
                        "a command still running then is killed, later steps are not run")
    p.add_argument("--results", type=path_option("write the results into the current folder"),
                   help="default: a temporary folder when $OUT is set or with --dry-run, "
                        "else benchmarks/results/gpu-<date>/")
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
        make_dir(results, "--results")  # a file there: named, with the fix
        env = environment(sys.executable, args.site.absolute())
        meta = header(sys.executable, env, suite_device(args.dry_run), argv, args.dry_run)
        deadline = start + args.budget if args.budget else math.inf
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            # absolute: the commands run in the checkout, the caller named them from elsewhere
            work = args.work.absolute() if args.work else Path(tmp)
            suite = Suite(results, work, sys.executable, env, args.dry_run,
                          meta, steps, deadline, bundle)
            failed = run_steps(suite)
        say((results / "summary.md").read_text(encoding=ENCODING))
        say(f"results in {results}" + (f", packed into {bundle}" if bundle else ""))
        if failed:
            error_line(f"failed or not run: {', '.join(failed)}")
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""The GPU suite's runner: each step's commands in turn, within the step's time limit and the
suite's --budget, every command's output in the step's log, and the suite's record (suite.json,
summary.md, the bundle) saved after every command. tools/gpu_suite.py is its command line."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common.atomic import ENCODING, atomic_write, write_json, write_text
from common.streams import error_line, say
from tools import ROOT
from tools.gpu_steps import COMMANDS, LIMITS, STEP_LIMIT_S, Suite
from tools.gpu_summary import render

START_MIN_S = 30  # a command is not started with less of the budget left
RESERVE_S = 10  # of the budget, kept for the summary and the last bundle
STOP_WAIT_S = 30  # a command Ctrl-C reached gets this long to save and stop


def budget_left(s: Suite) -> float:
    """Seconds of --budget left for commands (RESERVE_S kept for the last save)."""
    return s.deadline - RESERVE_S - time.monotonic()


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

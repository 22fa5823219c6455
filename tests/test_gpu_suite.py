"""tools/gpu_suite.sh on the CPU: the dry run executes every step's real commands with tiny
sizes, packs its results into one bundle, stops at its --budget, and a Python that lacks ffcv
gets the .whl/ wheels installed or a clear error."""

from __future__ import annotations

import _ctypes
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import ROOT, run_code, run_gpu_suite, running, wait_until, worker_scope

from common.compile_modes import COMPILE_MODES, compile_text
from common.errors import SetupError
from tools import gpu_environment, gpu_run, gpu_steps, gpu_suite, gpu_summary
from tools.bench_names import overhead_text
from tools.bench_peers import PeerResult
from tools.bench_profile import ProfileResult
from tools.bench_sections import EpochResult, LoaderResult, StepResult
from tools.kernel_kinds import kernel_kinds

PY312 = Path("/root/.pyenv/versions/3.12.1/bin/python3")


@pytest.mark.slow
def test_the_suite_runs_every_module_with_gpu_tests():
    """A test marked gpu in a module the suite does not name would never run on a GPU."""
    marked = {path.name for path in (ROOT / "tests").glob("test_*.py")
              if re.search(r"^(@pytest\.mark\.gpu$|pytestmark = .*pytest\.mark\.gpu\b)",
                           path.read_text(), re.MULTILINE)}
    assert marked == set(gpu_steps.GPU_TESTS)


@pytest.mark.slow  # the whole suite's dry run: minutes, which -m "not slow" is to leave out
def test_dry_run_writes_every_step_with_its_header(gpu_suite_dry_run):
    results = gpu_suite_dry_run.results
    for step in gpu_steps.STEPS:
        head = dict(line[2:].split(": ", 1) for line in
                    (results / f"{step}.log").read_text().splitlines() if line.startswith("# ")
                    and ": " in line)
        assert head["step"] == step and head["device"] == "cpu" and head["dry_run"] == "True"
        assert head["command"].startswith("bash tools/gpu_suite.sh all --dry-run")
        for key in ("commit", "torch", "ffcv", "accelerate", "numba", "grad-cam", "python"):
            assert head[key], key
        assert int(head["dev_shm_bytes"]) == shutil.disk_usage("/dev/shm").total
        summary = json.loads((results / f"{step}.summary.json").read_text())
        assert summary["ok"] and all(c["status"] == "ok" for c in summary["commands"])
        assert summary["meta"]["step"] == step
    record = json.loads((results / "suite.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(gpu_steps.STEPS)  # in priority order
    assert record["not_run"] == []


@pytest.mark.slow
def test_dry_run_bench_steps_and_tests_leave_their_results(gpu_suite_dry_run):
    """Each bench step is one tools/bench.py --quick run of its sections (test_bench reads
    their figures); each test step leaves pytest's junit report."""
    results = gpu_suite_dry_run.results
    for name in ("tests-quick", "tests-e2e", "tests-e2e-alone"):
        assert "testsuite" in (results / f"{name}.xml").read_text()
    # each test's time on its line, as it ends, where the tests run in a row (the end-to-end
    # ones may be on several workers): the first H200 run's cut step left none. Its result
    # lines only: --durations lists any phase of 5 ms or more too ("0.01s setup tests/..."),
    # which a loaded machine's skips reached
    lines = [line for line in (results / "tests-quick.log").read_text().splitlines()
             if line.startswith("tests/test_gpu.py::")]
    assert lines and all(re.search(r"\d(\.\d+)?(us|ms|s)$", line) for line in lines), lines
    for name, sections in (("bench-epoch", ["loaders", "epoch", "mfu", "profile"]),
                           ("bench-peers", ["peers", "mfu"]), ("bench-step", ["step", "mfu"])):
        report = json.loads((results / f"{name}.json").read_text())
        assert report["meta"]["complete"] and list(report["meta"]["section_s"]) == sections
        assert report["meta"]["device"] == "cpu" and report["options"]["quick"]
        assert set(report) == {"meta", "options", *sections}, name
    assert (results / "bench-epoch.trace.json.gz").stat().st_size


@pytest.mark.slow
def test_dry_run_trains_the_fast_and_seed_pipelines(gpu_suite_dry_run):
    results = gpu_suite_dry_run.results
    for name, epochs in (("train-fast-compile", 1), ("train-fast-eager", 1), ("train-seed", 2)):
        rows = (results / name / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == epochs, name
        # a run's small files are kept (gpu_run.keep_run); its checkpoints stay out
        assert {p.name for p in (results / name).iterdir()} == {
            "config.json", "metrics.jsonl", "metrics.csv"}, name
    seed = json.loads((results / "train-seed" / "config.json").read_text())
    assert (seed["preset"], seed["loader"], seed["precision"], seed["compile"],
            seed["channels_last"]) == ("seed", "torchvision", "fp32", False, False)
    eager = json.loads((results / "train-fast-eager" / "config.json").read_text())
    assert eager["preset"] == "fast" and eager["compile"] is False


@pytest.mark.slow
def test_dry_run_bundle_holds_every_result_and_the_summary_names_the_figures(gpu_suite_dry_run):
    results, bundle, process = (gpu_suite_dry_run.results, gpu_suite_dry_run.bundle,
                                gpu_suite_dry_run.process)
    with tarfile.open(bundle) as tar:
        packed = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    assert packed == {str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()}
    summary = (bundle.parent / "suite.summary.md").read_text()
    assert summary == (results / "summary.md").read_text()
    assert summary in process.stdout  # the end of the output is what a lease hands back
    assert "| bench-epoch | bench-epoch | ok |" in summary and "Still to run" not in summary
    # profile-ffcv: bench-epoch's profile, its steps fed by the ffcv loader, with its trace
    assert "| profile-ffcv | profile-ffcv | ok |" in summary
    profile = json.loads((results / "profile-ffcv.json").read_text())["profile"]
    assert profile["loader"] == "ffcv" and profile["ops"]
    assert profile["trace"] == str(results / "profile-ffcv.trace.json.gz")
    assert (results / "profile-ffcv.trace.json.gz").stat().st_size > 0
    figures = summary.split("## Figures", 1)[1]
    for expected in ("- loader resident: ", "- epoch, ffcv loader, fp32 eager batch 64: ",
                     "data wait", "- MFU ", "- train-seed: 2 epochs in ", "- tests-e2e: ",
                     "- peers: default pipeline epoch", "- step bf16 channels_last eager",
                     "- step fp16 channels_last eager batch 64: skipped, TrainingError: "
                     "--precision fp16 needs a CUDA GPU"):
        assert expected in figures, expected


def without_import_checks(monkeypatch) -> None:
    """gpu_suite.main without its import checks and header (torch and ffcv imported in
    subprocesses: seconds), where they are not under test."""
    monkeypatch.setattr(gpu_environment, "missing", lambda python, env, names: {})
    monkeypatch.setattr(gpu_suite, "header", lambda *args: {})


@pytest.mark.slow
def test_with_out_set_a_short_budget_leaves_a_bundle_and_names_what_did_not_run(
        tmp_path, monkeypatch, capsys):
    """As on the device machine: $OUT gets two files, whatever the budget cut; the steps and
    commands the budget left out are named, with the command that runs them. The budget's
    margins are made small so the cut comes in seconds, not minutes."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the results folder goes
    monkeypatch.setattr(gpu_run, "START_MIN_S", 1)
    monkeypatch.setattr(gpu_run, "RESERVE_S", 2)
    without_import_checks(monkeypatch)  # 10 s, 25 s and more of the budget on a loaded machine
    # the seed run (2 epochs) and then the compiled one, thousands of epochs long: the budget
    # kills the second (or, on a slow enough machine, already the first, or leaves the second
    # too little to start) and nothing else can start then
    monkeypatch.setenv("GPU_SUITE_EPOCHS", "10000")
    code = gpu_suite.main(["train", "bench-epoch", "--dry-run", "--budget", "12"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "failed or not run: train, bench-epoch" in err
    assert sorted(p.name for p in out.iterdir()) == ["gpu-suite.summary.md", "gpu-suite.tar.gz"]
    (results,) = tmp_path.glob("gpu-suite-results-*")  # a fresh folder, packed into $OUT
    with tarfile.open(out / "gpu-suite.tar.gz") as tar:
        record = json.load(tar.extractfile("gpu-suite/suite.json"))
        assert record == json.loads((results / "suite.json").read_text())
        assert "gpu-suite/train.log" in tar.getnames()
    (train,) = record["steps"]
    statuses = [c["status"] for c in train["commands"]]
    assert statuses in (["ok", "killed at the budget"], ["killed at the budget", "not run"],
                        ["ok", "not run"])
    assert record["not_run"] == ["bench-epoch"] and not train["ok"]
    summary = (out / "gpu-suite.summary.md").read_text()
    assert "| bench-epoch | | not run: the budget was spent | |" in summary
    assert "Still to run: `bash tools/gpu_suite.sh train bench-epoch`" in summary


def test_a_command_is_not_started_with_less_than_its_minimum_of_the_step_limit(
        tmp_path, monkeypatch, capsys):
    """A step's second command, left under START_MIN_S of the step's limit, would be killed
    and read as a failure: it is recorded as not run, and the step as cut short by its limit."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["sleep", "3"]),
                                                              ("second", ["true"])])
    monkeypatch.setitem(gpu_steps.LIMITS, "two", gpu_run.START_MIN_S + 2)
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["two"])
    assert not gpu_run.run_step(suite, "two")
    assert [c["status"] for c in suite.done[0]["commands"]] == ["ok", "not run"]
    assert "two: cut short by its step limit" in capsys.readouterr().err


@pytest.mark.parametrize("cut, status, said", [
    ("step", "killed at the step limit", "two: FAILED; the whole log is "),
    ("budget", "killed at the budget", "two: cut short by the --budget; the log is ")])
def test_a_command_killed_at_a_limit_is_recorded_with_that_limit(tmp_path, monkeypatch, capsys,
                                                                 cut, status, said):
    """A hang (a quick test that never ends) is killed at its step's limit, so the next steps
    get their turn: a failure, its log's tail printed. Killed at the --budget, the step was
    cut short, no failure of its own. The margins are made small so the kill comes in
    seconds."""
    monkeypatch.setattr(gpu_run, "START_MIN_S", 1)
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("hang", ["sleep", "60"])])
    deadline = math.inf
    if cut == "step":
        monkeypatch.setitem(gpu_steps.LIMITS, "two", 3)
    else:
        deadline = time.monotonic() + gpu_run.RESERVE_S + 3
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["two"], deadline)
    assert not gpu_run.run_step(suite, "two")
    assert [c["status"] for c in suite.done[0]["commands"]] == [status]
    err = capsys.readouterr().err
    assert said in err and ("FAILED" in err) == (cut == "step"), err


COMMAND_SAVING_ON_CTRL_C = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
open(sys.argv[1], "w").write(str(os.getpid()))
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("saved and stopped", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_to_the_suite_reaches_its_command_and_waits_for_it_to_stop(tmp_path):
    """The command runs in a process group of its own, which the terminal's Ctrl-C does not
    reach: the suite passes it on and waits while the command saves and stops, rather than
    leaving it training on the GPU."""
    ready, log = tmp_path / "command.pid", tmp_path / "log"
    code = """
import os, signal, sys, threading, time
from pathlib import Path
from tools import gpu_run
signal.signal(signal.SIGINT, signal.default_int_handler)
ready = Path(sys.argv[1])

def interrupt():
    while not ready.exists() or not ready.read_text():
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
with open(sys.argv[2], "w") as log:
    try:
        gpu_run.run_command([sys.executable, "-c", sys.argv[3], sys.argv[1]],
                            dict(os.environ), log, 120)
    except KeyboardInterrupt:
        print("interrupted")
"""
    result = run_code(code, ready, log, COMMAND_SAVING_ON_CTRL_C)
    pid = int(ready.read_text())
    try:
        assert result.stdout == "interrupted\n", result.stderr[-2000:]
        assert log.read_text() == "saved and stopped\n" and not running(pid)
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_runs_epoch_time_leaves_out_its_warm_up_epoch(tmp_path):
    """The seed run has 2 epochs: a median of both was their mean, its first (cuDNN's and the
    allocator's start) inflating the seed-vs-default headline."""
    run = tmp_path / "train-seed"
    run.mkdir()
    rows = [dict(epoch=i + 1, seconds=s, eval_seconds=0.25, test_acc=0.5)
            for i, s in enumerate([10.0, 2.0, 3.0])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (line,) = gpu_summary.run_line(run, 20.0)
    assert "3 epochs in 20 s wall (15.0 s of training, 0.8 s of evaluation), 2.50 s per " \
           "training epoch (median after the first; first 10.0 s)" in line
    # the seed run's own 2 epochs: one after the first, still a median of it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (line,) = gpu_summary.run_line(run, 20.0)
    assert "2 epochs in 20 s wall (12.0 s of training, 0.5 s of evaluation), 2.00 s per " \
           "training epoch (median after the first; first 10.0 s)" in line


def test_a_one_epoch_runs_time_is_not_called_a_median_after_its_first(tmp_path):
    """A run of one epoch (the fast preset's GPU_SUITE_EPOCHS=1, every dry run) has no epoch
    after its first: its line said 'median after the first; first 10.0 s' of that one epoch's
    own time, warm-up and all, as if steady epochs had been measured."""
    run = tmp_path / "train-fast-compile"
    run.mkdir()
    row = dict(epoch=1, seconds=10.0, eval_seconds=0.25, test_acc=0.5)
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (line,) = gpu_summary.run_line(run, 20.0)
    assert "1 epoch in 20 s wall (10.0 s of training, 0.2 s of evaluation), 10.00 s per " \
           "training epoch (its one epoch, warm-up included)" in line


def test_a_failed_command_does_not_keep_the_next_one_of_its_step_from_running(tmp_path,
                                                                              monkeypatch):
    """The train step's seed run and the compiled run are independent: a failed seed run left
    the headline run not run, with the step's time unspent."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["false"]),
                                                              ("second", ["true"])])
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["two"])
    assert not gpu_run.run_step(suite, "two")
    assert [c["status"] for c in suite.done[0]["commands"]] == ["exit 1", "ok"]


def test_each_command_is_recorded_before_the_next_one_of_its_step_starts(tmp_path, monkeypatch):
    """The record (suite.json, summary.md, the bundle) is saved after every command, not only
    at its step's end: a suite killed during a step's long command (the device machine's call
    ending) keeps what the commands before it did. The second command reads the record."""
    record = tmp_path / "suite.json"
    reads = [sys.executable, "-c", "import json, pathlib; print(json.loads(pathlib.Path("
             f"{str(record)!r}).read_text())['steps'][0]['commands'][0]['status'])"]
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["true"]),
                                                              ("second", reads)])
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["two"])
    assert gpu_run.run_step(suite, "two"), (tmp_path / "two.log").read_text()
    assert "\nok\n# second: ok, " in (tmp_path / "two.log").read_text()


def test_a_test_steps_failure_is_printed_before_its_next_test_runs(tmp_path):
    """A test step killed at its limit never reaches pytest's end-of-run report: on the first
    H200 run a resume test's failure was lost so. The steps load tests.failures_at_once."""
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {}, [])
    argv = gpu_steps.pytest_step(suite, "tests-quick", "gpu")[0][1]
    assert argv[argv.index("tests.failures_at_once") - 1] == "-p"
    (tmp_path / "test_two.py").write_text(
        "def test_fails():\n    assert 1 == 2, 'the first test fails'\n\n\n"
        "def test_after():\n    pass\n")

    def pytest_output(*options: str) -> str:
        return subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                               *options, "test_two.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              ).stdout

    at_once = pytest_output("-p", "tests.failures_at_once")
    assert at_once.index("the first test fails") < at_once.index("test_after PASSED")
    at_end = pytest_output()
    assert at_end.index("the first test fails") > at_end.index("test_after PASSED")


def junit_tests(xml: Path) -> set[str]:
    """The test names in a junit report."""
    return {case.get("name") for case in ElementTree.parse(xml).getroot().iter("testcase")}


@pytest.mark.slow
def test_end_to_end_tests_spread_over_workers_and_the_gpu_alone_ones_run_after(
        gpu_suite_dry_run):
    """In a row on the first H200 run, 8 of the 10 end-to-end tests took 233 s before its
    budget cut the 9th: they run on pytest-xdist workers now, then those that need the GPU to
    themselves (out of memory, timing) one at a time. The dry run skips each, on 2 workers
    whatever the cores, but its commands, collection and scheduling are the GPU's."""
    results = gpu_suite_dry_run.results
    step, = (s for s in json.loads((results / "suite.json").read_text())["steps"]
             if s["step"] == "tests-e2e")
    (spread, argv), (alone, alone_argv) = ((c["name"], c["argv"]) for c in step["commands"])
    assert (spread, alone) == ("tests-e2e", "tests-e2e-alone")
    assert argv[argv.index("-n") + 1] == "2" and "-n" not in alone_argv
    spread_log, alone_log = (results / "tests-e2e.log").read_text().split("# tests-e2e: ok")
    assert "created: 2/2 workers" in spread_log and "workers" not in alone_log
    assert junit_tests(results / "tests-e2e-alone.xml") == {
        "test_impossible_batch_size_ends_in_the_out_of_memory_message",
        "test_bench_quick_on_cuda"}
    every = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-m",
         "gpu and slow", *(str(ROOT / "tests" / f) for f in gpu_steps.GPU_TESTS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    names = {line.split("::", 1)[1] for line in every.splitlines() if "::" in line}
    assert junit_tests(results / "tests-e2e.xml") == names - junit_tests(
        results / "tests-e2e-alone.xml")


def test_gpu_tests_share_a_worker_by_their_parameters():
    """A loader's two tests of one cuda_run share a worker, so its training runs once; the
    other end-to-end tests spread; other modules stay whole (their fixtures made once)."""
    gpu = "tests/test_gpu.py::"
    scope = worker_scope
    assert scope(f"{gpu}test_report_on_cuda[ffcv]") == scope(
        f"{gpu}test_cuda_run_reports_the_accuracy_of_its_checkpoint[ffcv]")
    assert scope(f"{gpu}test_report_on_cuda[ffcv]") != scope(f"{gpu}test_report_on_cuda[resident]")
    assert len({scope(f"{gpu}test_lr_find_on_cuda"), scope(f"{gpu}test_bench_quick_on_cuda"),
                scope(f"{gpu}test_report_on_cuda[ffcv]")}) == 3
    assert scope("tests/test_train.py::test_a[x]") == scope("tests/test_train.py::test_b")
    assert scope("tests/test_gpu_suite.py::test_a") == scope("tests/test_bench.py::test_b")


def test_a_command_past_its_limit_is_killed_with_its_children(tmp_path):
    """run_command's timeout ends the command's whole process group: a child it started
    (a DataLoader worker, a compile worker) does not live on to hold the GPU."""
    pid_file = tmp_path / "child.pid"
    argv = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    with open(tmp_path / "log", "w") as log:
        code, seconds = gpu_run.run_command(argv, dict(os.environ), log, timeout=2)
    assert code is None and seconds < 60
    child = int(pid_file.read_text())
    # SIGKILL is delivered at once; a zombie waits for init to reap it
    wait_until(lambda: not running(child), 5, f"the command's child ({child}) outlived the kill",
               interval=0.1)


def test_a_command_runs_in_its_own_group_but_in_the_suites_session(tmp_path):
    """The device machine ends what a call leaves running, except a process in a session of
    its own: a command the suite started with setsid would hold the GPU after a cut call."""
    argv = [sys.executable, "-c", "import os; print(os.getsid(0), os.getpgrp(), os.getpid())"]
    with open(tmp_path / "log", "w") as log:
        code, _ = gpu_run.run_command(argv, dict(os.environ), log, timeout=60)
    session, group, pid = map(int, (tmp_path / "log").read_text().split())
    assert code == 0 and session == os.getsid(0) and group == pid


def test_a_results_path_that_is_a_file_is_named_with_the_option_and_left_alone(tmp_path):
    """mkdir's bare 'File exists' came out as 'cannot use PATH: File exists. Check that the
    path exists', naming no option and asking for what was there."""
    results = tmp_path / "ckpt.pt"
    results.write_text("not a folder")
    process = run_gpu_suite("train", "--dry-run", "--results", results, timeout=120)
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
    assert process.stderr.splitlines()[-1] == (f"error: --results {results} is a file, not a "
                                               "folder; choose a writable folder.")
    assert results.read_text() == "not a folder"


@pytest.mark.parametrize("case", ["missing folder", "a folder", "read-only folder",
                                  "$OUT a file"])
def test_a_bundle_that_cannot_be_written_is_refused_before_any_step(tmp_path, monkeypatch,
                                                                    capsys, case, request):
    """Found before the first command (a folder was found after it, and the step's record was
    lost), and before a results folder is made for it ($OUT's temporary one was left)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("OUT", raising=False)
    args = ["tests-quick", "--dry-run"]
    if case == "missing folder":
        bundle, words = tmp_path / "missing" / "suite.tar.gz", f"{tmp_path / 'missing'} is missing"
    elif case == "a folder":
        bundle, words = tmp_path / "suite.tar.gz", "it is a folder; name a .tar.gz file"
        bundle.mkdir()
    elif case == "read-only folder":
        folder = request.getfixturevalue("read_only_dir")
        bundle, words = folder / "suite.tar.gz", f"{folder} cannot be written ("
    else:
        (tmp_path / "out").write_text("")
        monkeypatch.setenv("OUT", str(tmp_path / "out"))
        bundle, words = tmp_path / "out" / "gpu-suite.tar.gz", "is a file, not a folder"
    if case != "$OUT a file":
        args += ["--results", str(tmp_path / "r"), "--bundle", str(bundle)]
    before = sorted(tmp_path.iterdir())
    code = gpu_suite.main(args)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: --bundle {bundle}") and words in err, err
    assert sorted(tmp_path.iterdir()) == before  # no results folder, temporary or not


def test_a_step_clears_what_an_earlier_suite_left_for_its_commands(tmp_path, monkeypatch):
    """The summary reads the results folder: an old run's metrics beside a command that
    failed this time showed the old figures as this run's."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["false"])])
    stale = [tmp_path / "first" / "metrics.jsonl", tmp_path / "first.json",
             tmp_path / "first.trace.json.gz", tmp_path / "first.xml"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
    (tmp_path / "other.json").write_text("{}")  # another command's: kept
    suite = gpu_steps.Suite(tmp_path, tmp_path / "work", sys.executable, dict(os.environ),
                            True, {}, ["two"])
    assert not gpu_run.run_step(suite, "two")
    assert not any(path.exists() for path in stale) and (tmp_path / "other.json").exists()


def test_relative_paths_name_places_from_where_the_suite_is_called(tmp_path, monkeypatch):
    """gpu_suite.sh changed into the checkout: --results r wrote into it. The step's commands,
    which run in the checkout, get the same places as the suite."""
    for folder in ("b.tar.gz", "w"):
        (tmp_path / folder).mkdir()
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh"), "tests-quick",
                             "--dry-run", "--bundle", "b.tar.gz"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # a folder here only
    assert result.returncode == 1 and f"{tmp_path / 'b.tar.gz'}: it is a folder" in result.stderr
    monkeypatch.setattr(gpu_suite, "STEPS", (*gpu_suite.STEPS, "two"))
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [
        ("first", ["touch", str(s.results / "made"), str(s.work / "made")])])
    without_import_checks(monkeypatch)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert gpu_suite.main(["two", "--dry-run", "--results", "r", "--work", "w"]) == 0
    assert (tmp_path / "r" / "made").is_file() and (tmp_path / "w" / "made").is_file()


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a positive number of seconds"),
    (["--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
    (["--bundle", "out.zip"], "name a .tar.gz file"),
    (["train", "bench-grid"], "unknown step(s) bench-grid; choose from tests-quick, "),
    (["--results", ""], "an empty value would write the results into the current folder"),
    (["--work", " "], "an empty value would put the data and runs in the current folder"),
    (["--site", ""], "an empty value would install the wheels into the current folder"),
])
def test_impossible_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_without_dry_run_a_machine_without_gpu_is_told_so(tmp_path):
    result = run_gpu_suite("tests-quick", "--results", tmp_path / "r", timeout=120)
    assert result.returncode == 1
    assert "no CUDA GPU" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.slow
@pytest.mark.skipif(not PY312.exists() or not list((ROOT / ".whl").glob("ffcv-*.whl")),
                    reason="needs pyenv's Python 3.12 and wheels built by `make wheels`")
def test_a_python_without_ffcv_gets_the_wheels_installed(tmp_path):
    """pyenv's bare 3.12 (no numpy, no torch here): the wheels land in --site, then the
    missing numpy is named; on the GPU image the same path goes on to run the step."""
    site = tmp_path / "site"
    result = run_gpu_suite("tests-quick", "--dry-run", "--results", tmp_path / "r", "--site", site,
                   python=str(PY312), timeout=300)
    assert "installing" in result.stdout and result.returncode == 1
    assert (site / "ffcv" / "__init__.py").exists()
    assert (site / "pytorch_grad_cam" / "__init__.py").exists()
    assert "still cannot import ffcv" in result.stderr and "numpy" in result.stderr
    assert "Traceback" not in result.stderr


def probe_wheel(folder: Path, library: str) -> None:
    """A real wheel of one package, `lib_probe`, whose import dlopens `library` by name (as
    ffcv's bundled libGLX needs libX11.so.6): written in `folder` with zipfile."""
    info = "lib_probe-1.0.dist-info"
    files = {"lib_probe/__init__.py": f"import ctypes\nctypes.CDLL({library!r})\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: lib-probe\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "lib_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.mark.parametrize("carried", [True, False], ids=["in .whl/lib", "nowhere"])
def test_a_library_the_image_lacks_is_found_in_whl_lib_or_named(tmp_path, monkeypatch, capsys,
                                                                carried):
    """A wheel whose package needs a shared library the machine lacks: with the library in
    .whl/lib (tools/wheelhouse.sh copies libX11 and its needs there), the steps' environment
    gets .whl/lib on LD_LIBRARY_PATH and the import works; without it, the library is named."""
    library = "libcifar_probe.so.0"
    probe_wheel(tmp_path / ".whl", library)
    if carried:  # a real shared object (ctypes' own) under the name the package asks for
        (tmp_path / ".whl" / "lib").mkdir()
        shutil.copy(_ctypes.__file__, tmp_path / ".whl" / "lib" / library)
    monkeypatch.setattr(gpu_environment, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_environment, "NEEDED", ("lib_probe",))
    # the probe alone is imported: grad-cam (torch, OpenCV, scikit-learn), which this test is
    # not about, took seconds in each of the suite's import checks
    monkeypatch.setattr(gpu_environment, "WANTED", ())
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    site = tmp_path / "site"
    if carried:
        env = gpu_environment.environment(sys.executable, site)
        assert env["LD_LIBRARY_PATH"] == str(tmp_path / ".whl" / "lib")
        assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(site), str(tmp_path)]
        assert f"adding {tmp_path / '.whl' / 'lib'} to LD_LIBRARY_PATH" in capsys.readouterr().out
    else:
        with pytest.raises(SetupError,
                           match=f"still cannot import lib_probe: .*{library}"):
            gpu_environment.environment(sys.executable, site)
    assert (site / "lib_probe" / "__init__.py").exists()  # the wheel was installed either way


def test_whl_lib_goes_on_ld_library_path_only_for_a_library_that_failed_to_load(
        tmp_path, monkeypatch, capsys):
    """.whl/lib carries X11's libraries for ffcv's OpenCV; put first on LD_LIBRARY_PATH it
    shadows the machine's own, so it goes there only when an import failed for a missing .so,
    not for a package that is simply absent (grad-cam on a bare image)."""
    probe_wheel(tmp_path / ".whl", "libc.so.6")  # a library every machine has
    (tmp_path / ".whl" / "lib").mkdir()
    monkeypatch.setattr(gpu_environment, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_environment, "NEEDED", ("lib_probe",))
    monkeypatch.setattr(gpu_environment, "WANTED", ("no_such_cam_package",))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    env = gpu_environment.environment(sys.executable, tmp_path / "site")
    assert "LD_LIBRARY_PATH" not in env
    out = capsys.readouterr().out
    assert "LD_LIBRARY_PATH" not in out and "warning: no_such_cam_package cannot be" in out


def test_without_grad_cam_the_steps_run_and_are_warned(tmp_path, monkeypatch, capsys):
    """grad-cam needs OpenCV, scikit-learn and SciPy, which the wheels do not carry: an image
    without them must still run the training and bench steps (the whole suite stopped)."""
    monkeypatch.setattr(gpu_environment, "ROOT", tmp_path)  # no .whl/ here
    monkeypatch.setattr(gpu_environment, "WANTED", ("no_such_cam_package",))
    env = gpu_environment.environment(sys.executable, tmp_path / "site")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    assert ("warning: no_such_cam_package cannot be imported (ModuleNotFoundError: "
            in capsys.readouterr().out)
    monkeypatch.setattr(gpu_environment, "NEEDED", ("no_such_cam_package",))
    with pytest.raises(SetupError, match="no_such_cam_package"):  # what every step needs
        gpu_environment.environment(sys.executable, tmp_path / "site")


def test_a_python_that_cannot_start_is_named_not_taken_for_one_lacking_nothing(tmp_path):
    """The probe of what a Python lacks reads its output: a Python that cannot even start
    printed nothing, which read as 'lacks nothing', and every step then failed alike."""
    env = {**os.environ, "PYTHONHOME": str(tmp_path / "no-such-prefix")}  # fails at startup
    with pytest.raises(SetupError, match=rf"^{re.escape(sys.executable)} cannot run: .+"):
        gpu_environment.missing(sys.executable, env, ("json",))
    assert gpu_environment.missing(sys.executable, dict(os.environ), ("json", "no_such_mod")) == {
        "no_such_mod": "ModuleNotFoundError: No module named 'no_such_mod'"}


def test_ffcv_that_cannot_load_is_named_by_its_own_error(tmp_path):
    """The probe imports FFCV through the steps' guard (loaders.guards.importing_ffcv), whose
    advice is for a checkout's .venv: what it says of FFCV is the error beneath, the missing
    .so that decides whether .whl/lib goes on LD_LIBRARY_PATH."""
    (tmp_path / "ffcv").mkdir()
    (tmp_path / "ffcv" / "__init__.py").write_text(
        "raise ImportError('libturbojpeg.so.0: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    assert gpu_environment.missing(sys.executable, env, ("ffcv",)) == {
        "ffcv": "ImportError: libturbojpeg.so.0: cannot open shared object file"}


def test_the_header_names_a_package_the_image_lacks_as_none(monkeypatch):
    """A version the header reads of a package not installed is None, not the suite's end."""
    monkeypatch.setattr(gpu_environment, "VERSIONED", ("numba", "no-such-package"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    meta = gpu_environment.header(sys.executable, env, "cpu", [], True)
    assert meta["no-such-package"] is None and meta["numba"]


def test_wheelhouse_answers_help_and_refuses_an_unknown_option_before_building(tmp_path):
    """--help and a mistyped option return at once: neither apt, a venv nor a build starts,
    and no folder named after the option is made."""
    script = str(ROOT / "tools" / "wheelhouse.sh")
    shown = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0 and "Usage: bash tools/wheelhouse.sh [OUTDIR]" in shown.stdout
    refused = subprocess.run(["bash", script, "--out"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode == 2
    assert refused.stderr == ("wheelhouse: unknown option --out; usage: bash "
                              "tools/wheelhouse.sh [OUTDIR]\n")
    assert list(tmp_path.iterdir()) == []


# libX11 and what it needs, where Debian keeps them: the test's own list, so that one
# missing from what tools/wheelhouse.sh copies into .whl/lib still fails it
X11 = ("libX11.so.6", "libxcb.so.1", "libXau.so.6", "libXdmcp.so.6", "libbsd.so.0", "libmd.so.0")
SYSTEM_LIBS = Path("/usr/lib/x86_64-linux-gnu")


@pytest.mark.skipif(not list((ROOT / ".whl").glob("ffcv-*.whl")) or os.geteuid() != 0
                    or not shutil.which("unshare"),
                    reason="needs wheels built by `make wheels`, root and unshare")
def test_the_ffcv_wheels_opencv_loads_on_a_machine_without_x11_from_whl_lib(tmp_path):
    """The X11 libraries hidden in a mount namespace of its own, as on an image without them:
    the wheel's bundled opencv core (through libGLX) fails to load, and loads with .whl/lib."""
    (wheel,) = (ROOT / ".whl").glob("ffcv-*.whl")
    shutil.unpack_archive(wheel, tmp_path, "zip")
    (core,) = (tmp_path / "ffcv.libs").glob("libopencv_core*")
    hidden = [os.path.realpath(SYSTEM_LIBS / name) for name in X11 if (SYSTEM_LIBS / name).exists()]
    load = f"import ctypes; ctypes.CDLL({str(core)!r}); print('loaded')"
    script = "".join(f"mount --bind /dev/null {path}; " for path in hidden) + (
        f"{sys.executable} -c \"{load}\"; echo exit $?; "
        f"LD_LIBRARY_PATH={ROOT / '.whl' / 'lib'} {sys.executable} -c \"{load}\"")
    result = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True,
                            text=True, timeout=60)
    without, with_lib = result.stdout.split("exit ")
    assert "loaded" not in without and "libX11.so.6" in result.stderr
    assert with_lib.splitlines()[-1] == "loaded", result.stderr[-2000:]


def test_the_summary_reads_results_without_importing_torch():
    """A machine that only reads the results back needs no torch: gpu_summary imports none."""
    code = "import sys, tools.gpu_summary; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_summary_names_each_step_row_as_the_bench_does():
    """gpu_summary reads the bench JSON without importing torch, through the torch-free
    tools.bench_names the bench uses: its rows must read as the bench's on every mode."""
    for compile in (False, True):
        for mode in COMPILE_MODES:
            row = asdict(StepResult("bf16", "channels_last", compile, 512, 64, mode,
                                    images_per_s=1000.0))
            expected = ("eager" if not compile else "compiled" if mode == "default"
                        else f"compiled {mode}")
            assert compile_text(compile, mode) == expected
            assert gpu_summary.bench_lines({"step": [row]}) == [
                f"- step bf16 channels_last {compile_text(compile, mode)} batch 512: "
                "1,000 images/s"]


def test_the_summary_names_an_epoch_row_without_cudnn_autotuning_as_the_bench_does():
    """The epoch rows differ only in cuDNN's autotuning on CUDA; a row written before the field
    (the first H200 run's, which did not autotune) reads as untuned."""
    row = asdict(EpochResult("resident", "bf16", True, 512, 64, "reduce-overhead", False,
                             images=50_000, images_per_s=50_000.0, data_wait_share=0.01,
                             loader_overhead_share=0.02))
    line = ("- epoch, resident loader, bf16 compiled reduce-overhead batch 512{}: 1.000 s per "
            "50,000 images, data wait 1.0% (blocked in next()), loader overhead 2.0% (over "
            "steps on a batch on the device)")
    assert gpu_summary.bench_lines({"epoch": [row]}) == [line.format(", no cuDNN autotuning")]
    assert gpu_summary.bench_lines({"epoch": [row | {"cudnn_benchmark": True}]}) == [
        line.format("")]
    del row["cudnn_benchmark"]
    assert gpu_summary.bench_lines({"epoch": [row]}) == [line.format(", no cuDNN autotuning")]


def test_a_negative_loader_overhead_is_said_to_be_noise():
    """Steps on one batch timed slower than the whole epoch (a loaded machine: -514% seen) are
    no loader that saves time; the bench's line and the summary's say it is noise."""
    assert overhead_text(0.02) == "2.0%" and overhead_text(0.0) == "0.0%"  # none: no noise
    assert overhead_text(-5.141) == ("-514.1% (noise: the machine's load changed between the "
                                     "timings)")
    row = asdict(EpochResult("ffcv", "fp32", False, 512, 8, "default", False, images=1000,
                             images_per_s=1000.0, data_wait_share=0.0,
                             loader_overhead_share=-5.141))
    assert "loader overhead -514.1% (noise: " in gpu_summary.bench_lines({"epoch": [row]})[0]


def test_the_summary_tells_rows_apart_and_keeps_the_goals_digits():
    """Two rows of ours beside one peer, in the peer's output and in ours, read as two; two
    failed steps of one precision as two; 19.96x the seed is not rounded up to the 20x goal."""
    ours = dict(loader="resident", role="ours", augment="flip, translate 2 reflect",
                status="ok", reason="", versus="airbench.CifarLoader", images_per_s=2.0)
    failed = dict(status="skipped", reason="TrainingError: --precision fp16 needs a CUDA GPU")
    bench = {
        "peers": {"loaders": [{**ours, "output": "float16 3x32x32 channels_last", "ratio": 3.23},
                              {**ours, "output": "float32 3x32x32 channels_last", "ratio": 2.11}],
                  "epochs": [{"pipeline": "default", "images_per_s": 2e3, "vs_seed": 19.96}]},
        "step": [asdict(StepResult("fp16", layout, False, 64, 16)) | failed
                 for layout in ("channels_last", "contiguous")]}
    assert gpu_summary.bench_lines(bench) == [
        "- peers: resident (flip, translate 2 reflect; float16 3x32x32 channels_last) vs "
        "airbench.CifarLoader: 3.23x",
        "- peers: resident (flip, translate 2 reflect; float32 3x32x32 channels_last) vs "
        "airbench.CifarLoader: 2.11x",
        "- peers: default pipeline epoch 2,000 images/s, 19.96x seed",
        "- step fp16 channels_last eager batch 64: skipped, " + failed["reason"],
        "- step fp16 contiguous eager batch 64: skipped, " + failed["reason"]]


def test_the_summary_gives_the_loaders_the_mfu_and_what_failed_in_the_bench():
    """A loader's epoch in milliseconds from its images/s, each MFU in percent of its peak in
    TFLOP/s, none for a precision whose peak a run outpaced (a line says why), and a peer
    that did not run and the seed epochs' failure, with why: what a GPU run is read for."""
    loader = asdict(LoaderResult("resident", 512, images=50_000, images_per_s=2_000_000.0))
    mfu = {"rows": [{"config": "bf16 channels_last compiled batch 512", "mfu": 0.4567,
                     "peak_flops_per_s": 989.4e12},
                    {"config": "fp16 channels_last compiled batch 512", "mfu": None,
                     "peak_flops_per_s": 1e12}],
           "not_peaks": ["fp16"]}
    missing = asdict(PeerResult("airbench.CifarLoader", "peer", "flip, translate 2 reflect",
                                status="not installed", reason="no module 'airbench'"))
    peers = {"loaders": [missing], "epochs": [], "epochs_failed": "DataError: a damaged folder"}
    assert gpu_summary.bench_lines({"loaders": [loader], "mfu": mfu, "peers": peers}) == [
        "- loader resident: 2,000,000 images/s, 25.0 ms per 50,000-image epoch",
        "- MFU bf16 channels_last compiled batch 512: 45.7% of 989 TFLOP/s",
        "- no fp16 MFU: a fp16 run outpaced the fp16 matmul peak",
        "- peers airbench.CifarLoader (flip, translate 2 reflect): not installed, no module "
        "'airbench'",
        "- peers: seed vs default epochs failed: DataError: a damaged folder"]


def test_the_summary_gives_each_profiled_loaders_device_busy_time():
    """Whether a loader's epoch is the device's time or the host's (the first H200 run's
    resident loader against airbench's, not profiled then) is a line of every GPU run."""
    row = asdict(PeerResult("airbench.CifarLoader", "peer", "flip, translate 2 reflect",
                            output="float16 3x32x32 contiguous", images=50_000,
                            images_per_s=6_250_000.0, top_op="aten::index 1.50 ms",
                            device_busy_ms=2.5, device_events=400))
    assert gpu_summary.bench_lines({"peers": {"loaders": [row]}}) == [
        "- peers, profiled: airbench.CifarLoader (flip, translate 2 reflect; float16 3x32x32 "
        "contiguous): device busy 2.50 ms of a 8.00 ms epoch, 400 device events, most time in "
        "aten::index 1.50 ms"]
    cpu = row | dict(device_busy_ms=None, device_events=None)
    assert gpu_summary.bench_lines({"peers": {"loaders": [cpu]}}) == []
    # stock FFCV's ops run on its own thread, which the profiler does not record: no top op
    unseen = row | dict(top_op="")
    assert gpu_summary.bench_lines({"peers": {"loaders": [unseen]}})[0].endswith(
        "8.00 ms epoch, 400 device events")


def test_the_summary_gives_the_profiles_device_busy_share():
    """The questions the first H200 profile answered by hand (how much of a step the GPU
    works, and on what kinds of kernel) are summary lines of every GPU run; a CPU profile has
    no such figures."""
    kinds = kernel_kinds([(f"triton_poi_fused_{i}", 50.0) for i in range(7)]
                         + [("sm90_xmma_wgrad", 300.0), ("sm90_xmma_fprop", 200.0),
                            ("sm90_xmma_dgrad", 100.0), ("cutlass_gemm", 20.0),
                            ("Memset (Device)", 10.0), ("nll_loss_forward", 20.0)], 1)
    profile = asdict(ProfileResult("resident", "bf16", True, 512, 64, 3, 20, "self_device_ms",
                                   "", [], "reduce-overhead", device_busy_ms=6.33, step_ms=7.0,
                                   device_busy_share=6.33 / 7.0, kernel_kinds=kinds))
    assert gpu_summary.bench_lines({"profile": profile}) == [
        "- profile, resident loader, bf16 compiled reduce-overhead batch 512: device busy "
        "6.33 ms of a 7.00 ms step (90%)",
        # the kinds of most time, five of them
        "- profile, kernel time per step: Triton pointwise 0.35 ms (35%), convolution weight "
        "gradient 0.30 ms (30%), convolution forward 0.20 ms (20%), convolution input gradient "
        "0.10 ms (10%), matrix multiply 0.02 ms (2%)"]
    cpu = profile | dict(device_busy_ms=None, step_ms=None, device_busy_share=None,
                         kernel_kinds=None)
    assert gpu_summary.bench_lines({"profile": cpu}) == []


def test_the_summary_names_the_tests_that_failed_and_those_that_errored(tmp_path):
    """A test whose fixture broke (an error, not a failure) is as much a test to look at: the
    summary names both kinds, with pytest's counts."""
    xml = tmp_path / "tests-gpu.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="1" skipped="0">'
        '<testcase name="test_ok"/>'
        '<testcase name="test_wrong"><failure message="assert"/></testcase>'
        '<testcase name="test_broken_fixture"><error message="fixture"/></testcase>'
        '</testsuite></testsuites>')
    assert gpu_summary.tests_line(xml) == [
        "- tests-gpu: 3 tests, 1 failed, 1 errors, 0 skipped (test_wrong, test_broken_fixture)"]


def test_a_results_file_cut_short_reads_as_not_written_yet(tmp_path):
    """A step killed while writing its JSON leaves half of it: the summary of the rest of the
    suite is still written."""
    (tmp_path / "bench.json").write_text('{"loaders": [{"loader": "resident", "images_per')
    assert gpu_summary.read_json(tmp_path / "bench.json") == {}
    assert gpu_summary.read_json(tmp_path / "missing.json") == {}


def test_a_dry_runs_results_stay_out_of_the_repository(monkeypatch):
    """A dry run's CPU figures went to benchmarks/results/gpu-<date>/, beside a GPU's real
    results, where `git add` takes them; a real run's default stays that folder."""
    monkeypatch.delenv("OUT", raising=False)
    dry, _ = gpu_suite.outputs(gpu_suite.parse_args(["train", "--dry-run"]))
    try:
        assert dry.is_dir() and not dry.is_relative_to(ROOT) and not any(dry.iterdir())
    finally:
        shutil.rmtree(dry)
    real, bundle = gpu_suite.outputs(gpu_suite.parse_args(["train"]))
    assert real.parent == ROOT / "benchmarks" / "results" and real.name.startswith("gpu-")
    assert bundle is None


def test_with_out_set_a_real_run_writes_a_fresh_folder_bundled_into_out(tmp_path, monkeypatch):
    """On the device machine ($OUT set) the results go to a new temporary folder, packed into
    $OUT: in benchmarks/results/gpu-<date>/ a second call on the machine packed the first
    one's files with its own."""
    monkeypatch.setenv("OUT", str(tmp_path))
    folders = []
    try:
        for _ in range(2):
            results, bundle = gpu_suite.outputs(gpu_suite.parse_args(["train"]))
            folders.append(results)
            assert results.is_dir() and not results.is_relative_to(ROOT)
            assert not any(results.iterdir()) and bundle == tmp_path / "gpu-suite.tar.gz"
        assert folders[0] != folders[1]
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_outside_a_dry_run_the_commands_are_the_gpus_full_runs(tmp_path, monkeypatch):
    """A dry run's sizes (bench --quick, tiny images, width 8, 1 epoch, eager) on the GPU would
    spend a whole lease measuring nothing: the real commands run on cuda at full size, the
    fast preset's epochs compiled, each writing its figures into the results and its data
    into the work folder."""
    monkeypatch.delenv("GPU_SUITE_EPOCHS", raising=False)
    results, work = tmp_path / "results", tmp_path / "work"
    gpu = gpu_steps.Suite(results, work, sys.executable, dict(os.environ), False, {}, [])
    commands = dict(command for step in gpu_steps.STEPS
                    for command in gpu_steps.COMMANDS[step](gpu))
    benches = [argv for argv in commands.values() if argv[1].endswith("tools/bench.py")]
    assert len(benches) == 4
    for argv in benches:
        assert argv[argv.index("--device") + 1] == "cuda" and "--quick" not in argv
    for name in ("train-seed", "train-fast-compile", "train-fast-eager"):
        argv = commands[name]
        assert "--synthetic-size" not in argv and "--width" not in argv, name
        assert argv[argv.index("--out") + 1] == str(work / name)  # checkpoints stay in work
    for name in ("train-fast-compile", "train-fast-eager"):
        assert commands[name][commands[name].index("--epochs") + 1] == str(gpu_steps.EPOCHS)
    assert "--compile" in commands["train-fast-compile"] and gpu_steps.EPOCHS > 1
    for name, argv in commands.items():
        for option, suffix in (("--json", ".json"), ("--junitxml", ".xml")):
            if option in argv:
                assert argv[argv.index(option) + 1] == str(results / f"{name}{suffix}")
    # the data (50k images and their .beton files) stays in work, out of the packed results
    assert {argv[argv.index("--data-dir") + 1] for argv in commands.values()
            if "--data-dir" in argv} == {str(work / "data")}


def test_end_to_end_tests_get_a_worker_per_four_cores_and_at_most_four(monkeypatch):
    for cores, workers in ((2, 1), (7, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(gpu_steps, "available_cores", lambda cores=cores: cores)
        assert gpu_steps.test_workers(sys.executable, dict(os.environ), False) == workers, cores
        assert gpu_steps.test_workers(sys.executable, dict(os.environ), True) == 2, cores
    if PY312.exists():  # a Python without pytest-xdist: one worker, no -n
        assert gpu_steps.test_workers(str(PY312), dict(os.environ), True) == 1


@pytest.mark.parametrize("args, steps", [
    ([], list(gpu_steps.STEPS)),
    (["tests", "tests-quick", "bench-step", "bench"],
     ["tests-quick", "tests-e2e", "bench-step", "bench-peers", "bench-epoch", "profile-ffcv"]),
])
def test_the_steps_named_run_once_each_in_the_order_named(tmp_path, monkeypatch, args, steps):
    """No step named runs every step; a step named twice, or in a group named too (`make gpu
    STEP='tests tests-quick'`), ran twice, spending the lease on it again."""
    for step in gpu_steps.STEPS:
        monkeypatch.setitem(gpu_steps.COMMANDS, step, lambda s: [("first", ["true"])])
    without_import_checks(monkeypatch)
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_suite.main([*args, "--dry-run", "--results", str(tmp_path / "r")]) == 0
    record = json.loads((tmp_path / "r" / "suite.json").read_text())
    assert [step["step"] for step in record["steps"]] == steps and record["not_run"] == []


def test_the_budgets_reserve_is_kept_for_the_last_save(tmp_path, monkeypatch):
    """A command is not started with less than START_MIN_S left once RESERVE_S (the summary and
    the last bundle) is set aside: started, it would be killed, or leave no time to pack."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["true"])])
    deadline = time.monotonic() + gpu_run.RESERVE_S + gpu_run.START_MIN_S - 1
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["two"], deadline)
    assert not gpu_run.run_step(suite, "two")
    assert [c["status"] for c in suite.done[0]["commands"]] == ["not run"]


def test_a_summary_saved_mid_run_blames_no_budget_for_the_steps_still_to_come(tmp_path,
                                                                           monkeypatch):
    """The summary is saved after every command, so that a suite cut short (the lease ended,
    a Ctrl-C) keeps it: one saved after the first step's command said the second was 'not
    run: the budget was spent', with no --budget given; it is not reached yet. Only once the
    suite has ended are the steps left the budget's."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "one", lambda s: [("first", ["true"])])
    suite = gpu_steps.Suite(tmp_path, tmp_path, sys.executable, dict(os.environ), True, {},
                            ["one", "two"])
    assert gpu_run.run_step(suite, "one")
    summary = (tmp_path / "summary.md").read_text()
    assert "| two | | not reached yet | |" in summary and "budget" not in summary


def test_the_budget_counts_from_the_start_wheel_install_included(tmp_path, monkeypatch, capsys):
    """--budget ends the whole run, the wheels' install included: an install that spent the
    budget leaves no time to start a step (counted from after it, a lease would be overrun)."""
    monkeypatch.setitem(gpu_steps.COMMANDS, "two", lambda s: [("first", ["true"])])
    monkeypatch.setattr(gpu_suite, "STEPS", (*gpu_suite.STEPS, "two"))
    monkeypatch.setattr(gpu_run, "START_MIN_S", 1)
    monkeypatch.setattr(gpu_run, "RESERVE_S", 0)
    monkeypatch.setattr(gpu_suite, "header", lambda *args: {})
    # the install, here 2 s of a 2.5 s budget
    monkeypatch.setattr(gpu_suite, "environment", lambda *args: time.sleep(2) or {})
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_suite.main(["two", "--dry-run", "--results", str(tmp_path), "--budget",
                           "2.5"]) == 1
    assert "two: not run, the --budget is spent" in capsys.readouterr().err
    assert json.loads((tmp_path / "suite.json").read_text())["not_run"] == ["two"]

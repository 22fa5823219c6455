"""Every command line runs the ways users start it: by path, with -m, and as an installed
console script; and errors end in one line, never a traceback."""

from __future__ import annotations

import errno
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_code, run_script, running, wait_until

from common.cli import run_main
from common.errors import DataError, Interrupted
from tools.options import pick_device

SCRIPTS = {  # path -> (module, console script)
    "engine/train.py": ("engine.train", "cifar-train"),
    "loaders/prepare.py": ("loaders.prepare", "cifar-prepare"),
    "tools/report.py": ("tools.report", "cifar-report"),
    "tools/bench.py": ("tools.bench", "cifar-bench"),
    "tools/lr_find.py": ("tools.lr_find", "cifar-lr-find"),
    "tools/compare.py": ("tools.compare", "cifar-compare"),
    "tools/predict.py": ("tools.predict", "cifar-predict"),
    "tools/export.py": ("tools.export", "cifar-export"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_as_a_module(script):
    """`python -m module --help` answers with its usage. Run by path, each script answers in
    test_commands_answer_help_and_refusals_before_torch_loads."""
    module, _ = SCRIPTS[script]
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:200]


# python -c this script args: the script as `python script args` runs it, its folder first on
# sys.path as there (python -c puts the current folder), so that a module beside it named
# like one it imports is found first as it would be; then the heavy libraries it had imported
# by the time it exited, on the last line of stderr
IMPORTED_BY_EXIT = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = [m for m in ("torch", "numpy", "accelerate") if m in sys.modules]
    sys.stderr.write(f"imported: {' '.join(heavy) or 'none'}\\n")
"""


# (script, arguments, exit status): a command line each script answers in plain Python
ANSWERED_BEFORE_TORCH = [
    *[(script, ["--help"], 0) for script in (
        "engine/train.py", "loaders/prepare.py", "tools/report.py", "tools/predict.py",
        "tools/export.py", "tools/bench.py", "tools/lr_find.py", "tools/compare.py")],
    ("engine/train.py", ["--epochs", "0", "--out", "{tmp}/run"], 2),
    ("engine/train.py", ["--loader", "nope", "--out", "{tmp}/run"], 2),
    ("engine/train.py", ["--out", "{tmp}/run", "--preset"], 2),
    ("engine/train.py", ["--synthetic-size", "9", "1", "--out", "{tmp}/run"], 2),
    ("loaders/prepare.py", ["--dataset", "nope", "--data-dir", "{tmp}/data"], 2),
    ("tools/report.py", ["x.pt", "-n", "0", "--out", "{tmp}/report"], 2),
    ("tools/report.py", ["x.pt", "--methods", "nope"], 2),
    ("tools/predict.py", ["x.pt", "a.png", "-k", "0"], 2),
    ("tools/export.py", ["x.pt", "--format", "nope", "--out", "{tmp}/model.onnx"], 2),
    ("tools/export.py", ["x.pt", "--out", "{tmp}/model.onnx"], 2),  # no --format
    ("tools/bench.py", ["--precisions", "nope", "--json", "{tmp}/bench.json"], 2),
    ("tools/bench.py", ["--epochs", "0"], 2),
    ("tools/lr_find.py", ["--iterations", "0", "--out", "{tmp}/lr"], 2),
    ("tools/compare.py", ["--optimizers", "nope", "--out", "{tmp}/compare"], 2),
]


# (script, arguments, the prefix among them): a prefix of one of each command's options, which
# argparse would take for the option
PREFIXES = [
    ("engine/train.py", ["--epoch", "1"], "--epoch"),
    ("loaders/prepare.py", ["--synthetic", "9", "9"], "--synthetic"),
    ("tools/report.py", ["x.pt", "--meth", "gradcam"], "--meth"),
    ("tools/predict.py", ["x.pt", "a.png", "--js"], "--js"),
    ("tools/export.py", ["x.pt", "--format", "onnx", "--ou", "m.onnx"], "--ou"),
    ("tools/bench.py", ["--js", "x.json"], "--js"),
    ("tools/lr_find.py", ["--iter", "5"], "--iter"),
    ("tools/compare.py", ["--optimizers", "sgd", "--epoch", "1"], "--epoch"),
]


@pytest.mark.parametrize("script, args, prefix", PREFIXES, ids=[s for s, _, _ in PREFIXES])
def test_every_command_takes_options_whole_not_as_prefixes(script: str, args: list[str],
                                                           prefix: str) -> None:
    """Some commands took `--epoch` for `--epochs` (argparse's default), lr_find and compare
    did not: now none does, since a prefix breaks or changes meaning once an option is added."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: unrecognized arguments: {prefix}" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("script, args, code", ANSWERED_BEFORE_TORCH,
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in ANSWERED_BEFORE_TORCH])
def test_commands_answer_help_and_refusals_before_torch_loads(script, args, code, tmp_path):
    """Every command parses its options in plain Python first: torch (seconds) loads only for
    a command line that can run, and nothing is written for one that cannot."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-c", IMPORTED_BY_EXIT, str(ROOT / script), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == "imported: none", result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())
    # the help on stdout, where `| less` reads it; a refusal says nothing there
    assert result.stdout.startswith("usage:") == (args == ["--help"]), result.stdout[:200]


def test_help_and_refusals_wait_for_no_grad_cam():
    """pytorch-grad-cam brings torchvision, scikit-learn and scipy (seconds): report's and
    predict's work (tools/report_folder.py, tools/prediction.py) imports it only when it draws a
    map, so a refused checkpoint is quick."""
    code = ("import sys, tools.report_folder, tools.prediction\n"
            "heavy = {'pytorch_grad_cam', 'sklearn'} & set(sys.modules)\n"
            "sys.exit(' '.join(sorted(heavy)) or None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"imported at start: {result.stderr[-2000:]}"


def test_predict_loads_none_of_the_report():
    """predict shares the CAMs, the model's input and the folder writes with report, not
    report's modules: those bring matplotlib's PDF backend and the report's tables."""
    code = ("import sys, tools.prediction\n"
            "loaded = {'matplotlib.backends.backend_pdf', 'tools.report_folder',\n"
            "          'tools.report_figures', 'tools.report_inputs'} & set(sys.modules)\n"
            "sys.exit(' '.join(sorted(loaded)) or None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"imported with predict: {result.stderr[-2000:]}"


# python -c this script args: a real SIGINT as the import of the COUNT-th module whose name
# starts with one of PREFIXES begins. SIGINT as a terminal's foreground command has it: a test
# run started in the background (`cmd &` without job control) passes SIGINT ignored down to
# every command, and a command that finds it ignored rightly runs on (interruptible_imports)
INTERRUPT_WHILE_IMPORTING = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a command typed at a terminal
prefixes, count = tuple(os.environ["PREFIXES"].split()), int(os.environ["COUNT"])
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        global count
        count -= name.startswith(prefixes)
        if count == 0:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Interrupt())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# options with which each script gets past parsing and goes on to import torch; what they name
# is not there, so a script the Ctrl-C missed stops soon after
PAST_PARSING = {
    "engine/train.py": ["--resume", "no-such-run"],
    "loaders/prepare.py": ["--dataset", "folder", "--data-dir", "no-such-folder"],
    "tools/report.py": ["no-such.pt"],
    "tools/predict.py": ["no-such.pt", "no-such.png"],
    "tools/export.py": ["no-such.pt", "--format", "onnx"],
    "tools/bench.py": ["--device", "cpu", "--sections", "mfu", "--quick",
                       "--data-dir", "no-such-folder"],
    "tools/lr_find.py": ["--dataset", "folder", "--data-dir", "no-such-folder"],
    "tools/compare.py": ["--dataset", "folder", "--data-dir", "no-such-folder"],
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("prefixes, count", [("numpy torch", 1), ("numpy", 20)],
                         ids=["as torch or numpy starts", "inside numpy"])
def test_ctrl_c_while_a_script_still_imports_is_one_line(script, prefixes, count):
    # torch takes seconds to import (more for report, with grad-cam and matplotlib): a Ctrl-C
    # then printed a KeyboardInterrupt traceback through importlib. Inside numpy, while torch
    # imports it, it was swallowed: the command ran on (--help printed, exit 0), or failed
    # later on the half-imported numpy (RecursionError)
    result = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, str(ROOT / script),
                             *PAST_PARSING[script]], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PREFIXES": prefixes, "COUNT": str(count)})
    assert (result.returncode, result.stderr.strip(), result.stdout) == (130, "interrupted", ""), \
        result.stderr[-2000:]


@pytest.mark.parametrize("body, stdout", [("print('all written')", "all written\n"),
                                          ("sys.stdout.close()", "")],  # | head, say
                         ids=["output", "closed output"])
def test_ctrl_c_while_the_interpreter_shuts_down_exits_at_once_and_silently(body, stdout):
    # torch's teardown takes seconds after a command's last line; a Ctrl-C in it printed an
    # "Exception ignored in atexit callback" traceback. The harness's own atexit callback,
    # registered first so run last (after run_main's), sends the real signal and then takes
    # a slow teardown's time (Python 3.10 runs a handler at its next check, not in os.kill)
    code = ("import atexit, os, signal, sys, time; atexit.register(lambda: (os.kill("
            "os.getpid(), signal.SIGINT), time.sleep(60))); import torch; "
            f"from common.cli import run_main; sys.exit(run_main(lambda: {body}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (130, stdout, "")


def test_ctrl_c_at_exit_inside_a_flush_of_the_output_still_exits_at_once_and_silently():
    # a buffered writer runs signal handlers between its writes to the file, so the handler
    # can run inside the flush of the very stream it flushes: a flush cannot be entered twice
    code = """
import io, os, signal, sys
from common.stop_signals import exit_at_once_on_ctrl_c

class Terminal(io.RawIOBase):  # stdout whose write brings a Ctrl-C
    def writable(self):
        return True

    def write(self, data):
        os.write(1, data)
        os.kill(os.getpid(), signal.SIGINT)
        return len(data)

sys.stdout = io.TextIOWrapper(io.BufferedWriter(Terminal()))
exit_at_once_on_ctrl_c()
print("all written")
sys.stdout.flush()
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (130, "all written\n", "")


def buffered_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED (a CI runner or container may set it): the
    standard streams buffered, as a user's are, so that what a buffer still holds shows."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_output_written_at_exit_before_a_ctrl_c_there_is_kept():
    """The script's own output is flushed as it ends, but an atexit callback's (a tracker's
    closing summary, say) may still sit in stdout's buffer when a Ctrl-C ends the process at
    once: it is flushed first."""
    code = ("import atexit, os, signal, sys, time; atexit.register(lambda: (print('at exit'), "
            "os.kill(os.getpid(), signal.SIGINT), time.sleep(60)))\n"
            "from common.cli import run_main; sys.exit(run_main(lambda: print('all written')))")
    result = run_code(code, env=buffered_env())
    assert (result.returncode, result.stdout, result.stderr) == (130, "all written\nat exit\n",
                                                                 "")


LAZY_MODULE = ("import types; lazy = types.ModuleType('lazy'); sys.modules['lazy'] = lazy;"
               " lazy.__getattr__ = lambda name: exec('raise ImportError(name)');"
               " sys.modules['odd'] = object();")


@pytest.mark.parametrize("modules", ["", LAZY_MODULE])
def test_the_last_collection_at_exit_is_spared_and_atexit_callbacks_still_run(modules):
    # the harness's callback, registered first, runs last: after run_main's gc.freeze. The
    # search for nanobind's modules before it reads no attribute through a lazy module's hook
    # (one that raises was a traceback at exit), nor of what is no module in sys.modules
    code = ("import atexit, gc, sys; atexit.register(lambda: print(gc.get_freeze_count() > 0));"
            f" {modules} from common.cli import run_main;"
            " sys.exit(run_main(lambda: print('done')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\nTrue\n", "")


def triton_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version("triton").split(".")[:2])
    except PackageNotFoundError:
        return ()


@pytest.mark.skipif(triton_version() < (3, 9), reason="triton is built with nanobind from 3.9")
def test_no_leak_reports_at_exit_once_a_nanobind_extension_is_loaded():
    # nanobind's check at exit took every object the freeze kept alive for a leak: thirty-odd
    # lines after the last of any command that compiled (torch.compile imports triton)
    code = ("import atexit, gc, sys; atexit.register(lambda: print(gc.get_freeze_count() > 0));"
            " import triton; from common.cli import run_main;"
            " sys.exit(run_main(lambda: print('done')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\nFalse\n", "")


def test_every_console_script_is_installed_and_calls_its_main():
    scripts = {e.name: e for e in entry_points(group="console_scripts")}
    for script, (module, console) in SCRIPTS.items():
        assert console in scripts, f"{console} is not installed; pip install -e ."
        assert scripts[console].value == f"{module}:main", script
        assert shutil.which(console, path=str(Path(sys.executable).parent)), console


@pytest.mark.slow
def test_a_console_script_runs():
    executable = shutil.which("cifar-train", path=str(Path(sys.executable).parent))
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]


def test_run_main_maps_errors_to_one_line_and_an_exit_code(capsys):
    def fails():
        raise DataError("data/x is missing; run prepare")

    def stopped():
        raise Interrupted("runs/a/ckpt.pt holds epoch 2")

    def unwritable():
        Path("/proc/definitely/not/here").write_text("x")

    assert run_main(lambda: None) == 0
    assert run_main(lambda: 3) == 3
    assert run_main(fails) == 1
    assert capsys.readouterr().err == "error: data/x is missing; run prepare\n"
    assert run_main(stopped) == 130
    assert capsys.readouterr().err.strip() == "interrupted: runs/a/ckpt.pt holds epoch 2"
    assert run_main(unwritable) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use /proc/definitely/not/here") and "\n" not in err[:-1]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])  # a full disk, a used-up quota
def test_run_main_names_a_full_disk_and_a_lack_of_memory(capsys, code):
    def full():
        raise OSError(code, os.strerror(code), "runs/a/ckpt.pt")

    def huge():
        return np.zeros(1 << 62, dtype=np.uint8)  # numpy's MemoryError, not an OSError

    assert run_main(full) == 1
    assert capsys.readouterr().err == ("error: the disk is full writing runs/a/ckpt.pt; free "
                                       "some space or write to another disk.\n")
    assert run_main(huge) == 1
    assert capsys.readouterr().err.startswith("error: out of memory; ")


def test_a_ctrl_c_a_library_turns_into_its_own_error_is_still_a_ctrl_c(capsys):
    """torch's exporter, stopped while it imports dynamo, raised TorchExportError from the
    KeyboardInterrupt: a traceback and exit 1 instead of one line and 130. An error after a
    stop is the stop's doing; without one, an unexpected error is a bug, raised."""
    def wrapped():
        try:
            os.kill(os.getpid(), signal.SIGINT)  # run_main's handler raises it here
            signal.sigtimedwait([], 5)  # not reached: the interrupt comes first
        except KeyboardInterrupt as stop:
            raise RuntimeError("Failed to export the model with torch.export") from stop

    assert run_main(wrapped) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_each_line_run_main_prints_is_one_write(monkeypatch):
    """Processes sharing one stderr (torchrun's) interleave write by write, and stderr writes
    through: print() made a line's text and its newline two writes, so one process's line
    ended inside another's."""
    writes = []

    class Recorder:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    def raises(error: BaseException):
        def body():
            raise error
        return body

    monkeypatch.setattr(sys, "stderr", Recorder())
    for error in (DataError("data/x is missing"), OSError(errno.ENOSPC, "full", "ckpt.pt"),
                  MemoryError(), KeyboardInterrupt(), Interrupted("ckpt.pt holds epoch 2")):
        run_main(raises(error))
    assert len(writes) == 5 and all(text.endswith("\n") for text in writes), writes
    assert writes[0] == "error: data/x is missing\n"


# run_main(body), with signal sys.argv[2] sent to the process as run_main reaches the
# sys.argv[1]-th line it runs (from 1), unless that is the body's call: then "past" on stderr.
# Not at `try:` and the assignment before it: Python runs a signal's handler at a call or a
# backward jump, which neither holds, but the trace function's own calls would.
SIGNAL_AT_LINE = """
import inspect, os, signal, sys
import common.cli
nth, signum = int(sys.argv[1]), int(sys.argv[2])
lines, first = inspect.getsourcelines(common.cli.run_main)
body_line = first + next(i for i, text in enumerate(lines) if "body()" in text)
quiet = {first + i for i, text in enumerate(lines)
         if text.strip() == "try:" or text.strip().startswith("previous, hook = ")}
reached = 0
def trace(frame, event, arg):
    global reached
    if frame.f_code is not common.cli.run_main.__code__:
        return None
    if event == "line" and frame.f_lineno not in quiet and (reached := reached + 1) == nth:
        sys.settrace(None)
        if frame.f_lineno >= body_line:
            print("past", file=sys.stderr)
        else:
            os.kill(os.getpid(), signum)
    return trace
sys.settrace(trace)
sys.exit(common.cli.run_main(lambda: print("body ran")))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_at_any_line_before_the_body_is_a_clean_stop(signum):
    """A Ctrl-C as run_main set up (Python's own handler; or run_main's, in place before its
    try) ended in a KeyboardInterrupt traceback. At each line it runs up to the body's call:
    one line and the stop's code, or SIGTERM's default action before its handler is in
    place."""
    codes = {signal.SIGINT: (130,), signal.SIGTERM: (143, -signal.SIGTERM)}[signum]
    for nth in range(1, 100):
        result = run_code(SIGNAL_AT_LINE, nth, int(signum))
        if result.stderr == "past\n":
            break
        assert "Traceback" not in result.stderr, (nth, result.stderr)
        assert result.returncode in codes, (nth, result.returncode, result.stderr)
        # the one line, or nothing where SIGTERM's default action ended the process
        assert result.stderr == ("" if result.returncode < 0 else "\ninterrupted\n"), nth
        assert result.stdout == "", (nth, result.stdout)  # stopped before the body ran
    assert nth > 5, "run_main's lines were not traced"


def run_ignoring(code: str, signum: int) -> subprocess.CompletedProcess:
    """`python -c code` started with `signum` ignored, as bash starts a script's background job
    (SIGINT) and nohup its command (SIGHUP)."""
    return run_code(code, preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))


def test_a_ctrl_c_ignored_as_the_command_starts_stays_ignored():
    """bash starts a script's background job with SIGINT ignored: run_main's handler made the
    terminal's Ctrl-C, meant for the foreground, stop the job (exit 130)."""
    code = ("import os, signal, sys; from common.cli import run_main; "
            "sys.exit(run_main(lambda: (os.kill(os.getpid(), signal.SIGINT), print('done'))[1]))")
    result = run_ignoring(code, signal.SIGINT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "")


# a process torchrun started (TORCHELASTIC_RUN_ID), as it imports torch: forever, until a signal
LAUNCHED_IMPORTING = ("import time; from common.cli import interruptible_imports\n"
                      "with interruptible_imports():\n"
                      "    print('importing', flush=True)\n"
                      "    while True:\n"
                      "        time.sleep(0.01)")
# the launcher: starts it, says its pid once it imports, then is killed outright
LAUNCHER = ("import os, signal, subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
            "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, "
            "env={**os.environ, 'TORCHELASTIC_RUN_ID': 'test'})\n"
            "assert child.stdout.readline() == b'importing\\n'\n"
            "print(child.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_while_its_process_imports_torch_stops_that_process():
    """A launcher killed outright while its process still imported torch (seconds, before
    run_main's handlers) left that process running unseen when only run_main asked for a
    SIGTERM at the launcher's death."""
    stops_once_its_launcher_is_killed(LAUNCHER, LAUNCHED_IMPORTING)


def stops_once_its_launcher_is_killed(launcher: str, code: str) -> None:
    """Run `launcher` (as LAUNCHER: it starts `code` and is killed outright) and wait for the
    process it started to end."""
    result = subprocess.run([sys.executable, "-c", launcher, code], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(result.stdout)
    try:
        wait_until(lambda: not running(child), 30,
                   f"process {child} runs on after its launcher was killed", interval=0.05)
    finally:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


# a process torchrun started that reaches its imports only once its launcher has gone (its
# stdin, a pipe from the launcher, then ends): the launcher died before any parent-death request
LAUNCHED_LATE = ("import sys, time; from common.cli import interruptible_imports\n"
                 "print('importing', flush=True)\n"
                 "sys.stdin.read()\n"
                 "with interruptible_imports():\n"
                 "    while True:\n"
                 "        time.sleep(0.01)")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_before_its_process_asked_for_its_death_stops_that_process():
    """Linux signals a parent's death only to processes that asked before it: a launcher
    killed in the moment before (a command's options being read) left its process running."""
    stops_once_its_launcher_is_killed(LAUNCHER.replace(
        "stdout=subprocess.PIPE,", "stdin=subprocess.PIPE, stdout=subprocess.PIPE,"),
        LAUNCHED_LATE)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_nohup_launcher_killed_while_its_process_imports_torch_stops_that_process():
    """`nohup torchrun ...` leaves SIGHUP ignored in the launcher and its processes: the signal
    asked for at the launcher's death must be one they act on (SIGTERM), or they train on."""
    stops_once_its_launcher_is_killed(
        "import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup\n" + LAUNCHER,
        LAUNCHED_IMPORTING)


def test_a_background_jobs_ctrl_c_stays_ignored_while_it_imports_and_at_exit():
    """SIGINT ignored (a script's background job): a Ctrl-C while the command imports torch, or
    once its work is done, is not meant for it either."""
    code = ("import os, signal; from common.cli import interruptible_imports\n"
            "from common.stop_signals import exit_at_once_on_ctrl_c\n"
            "with interruptible_imports(): os.kill(os.getpid(), signal.SIGINT)\n"
            "exit_at_once_on_ctrl_c(); os.kill(os.getpid(), signal.SIGINT); print('ran on')")
    result = run_ignoring(code, signal.SIGINT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran on\n", "")


def test_of_two_stop_signals_in_a_held_block_the_first_is_acted_on_by_its_own_handler():
    """Outside run_main (engine.loop.train called as a library) each signal has a handler of
    its own: a SIGTERM and then a Ctrl-C inside stop_signals_held end the process as the
    SIGTERM's would (killed by it), not as a Ctrl-C (a KeyboardInterrupt traceback)."""
    code = ("import os, signal; from common.stop_signals import stop_signals_held\n"
            "with stop_signals_held():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "print('ran on')")
    result = run_code(code)
    assert (result.returncode, result.stdout, result.stderr) == (-signal.SIGTERM, "", "")


def stop_lost_in_a_finalizer(signum: str, then: str, setup: str = "") -> str:
    """Code that runs `setup`, then run_main of a body whose dropped object's __del__ sends
    signal `signum` (its KeyboardInterrupt, raised in a finalizer, is lost), then runs `then`."""
    return ("import os, signal, sys; from common.cli import run_main\n"
            f"{setup}"
            "class Stops:\n"
            "    def __del__(self):\n"
            f"        os.kill(os.getpid(), signal.{signum})\n"
            "def body():\n"
            "    Stops()\n"
            f"    {then}\n"
            "sys.exit(run_main(body))")


def test_a_stop_signal_lost_before_the_output_broke_still_ends_as_stopped():
    """A Ctrl-C lost in a finalizer, and then a write to an output whose reader has gone (the
    `| tee` the same Ctrl-C ended): 130, the Ctrl-C's code, not a broken pipe's message."""
    result = run_code(stop_lost_in_a_finalizer(
        "SIGINT", "print('a line', flush=True)",
        setup="read, write = os.pipe(); os.close(read); os.dup2(write, 1)\n"))
    assert (result.returncode, result.stderr) == (130, "")


def test_a_stop_signal_after_an_ignored_one_in_a_held_block_still_stops():
    """`nohup` ignores SIGHUP: a hang-up and then a SIGTERM inside stop_signals_held acted on
    the first (ignored, so nothing), and the SIGTERM was lost: the command ran on."""
    code = ("import os, signal, sys; from common.cli import run_main\n"
            "from common.stop_signals import stop_signals_held\n"
            "def body():\n"
            "    with stop_signals_held():\n"
            "        os.kill(os.getpid(), signal.SIGHUP)\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('ran on')\n"
            "sys.exit(run_main(body))")
    result = run_ignoring(code, signal.SIGHUP)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "\ninterrupted\n")


@pytest.mark.parametrize("block", ["stop_signals_held", "stop_signals_end_at_once"])
def test_a_signal_block_in_another_thread_runs_as_it_is(block):
    """Only the main thread may set signal handlers or the wakeup descriptor: a held or
    end-at-once block in another thread (a loader's or a writer's) runs as it is, Python
    delivering the signals to the main thread anyway, where setting them there was a
    ValueError that ended that thread's work."""
    from common import stop_signals

    ran: list[str] = []

    def work() -> None:
        try:
            with getattr(stop_signals, block)():
                ran.append("inside")
        except ValueError as error:
            ran.append(f"refused: {error}")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert ran == ["inside"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_hang_up_after_a_signal_keeps_that_signals_exit_code():
    """A terminal that hung up stops the command as its SIGHUP would (129), unless a signal
    had already stopped it: a SIGTERM's run then ends 143, as the first stop says."""
    from common import stop_signals

    try:
        stop_signals.note_hang_up()
        assert stop_signals.stopped_code() == 129
        stop_signals.forget_stop()
        with pytest.raises(KeyboardInterrupt):
            stop_signals.on_stop_signal(signal.SIGTERM, None)
        stop_signals.note_hang_up()
        assert stop_signals.stopped_code() == 143
    finally:
        stop_signals.forget_stop()


# a command whose error brings the signal argv[1] as it is said, and whose stdout still holds a
# line as run_main ends: the moment a launcher stops the processes left once one has failed
STOPPED_AS_IT_FAILS = """
import os, signal, sys
from common.cli import run_main
from common.errors import RunFailed
class Failed(RunFailed):
    def __str__(self):
        os.kill(os.getpid(), signal.Signals[sys.argv[1]])
        return "process 1 of 2 stops"
def body():
    print("epoch 1")
    raise Failed()
sys.exit(run_main(body))
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_that_comes_as_a_failure_is_said_changes_nothing(stop):
    """torchrun stops the processes left once one has failed (SIGTERM): raised as a process
    said its own error, the stop ran through run_main's last lines into a traceback
    ([rank1]: Traceback ... on_stop_signal). Once the body has ended, its outcome stands."""
    result = run_code(STOPPED_AS_IT_FAILS, stop)
    assert (result.returncode, result.stdout) == (1, "epoch 1\n"), result.stderr
    assert result.stderr == "error: process 1 of 2 stops\n"


def test_a_stop_lost_in_a_finalizer_prints_no_exception_ignored_report():
    """Python prints 'Exception ignored in: <function ...__del__>' and the traceback of a
    KeyboardInterrupt raised in a finalizer (or logging's at-fork hook), and drops the stop;
    run_main raises it again, so the command still ends as stopped (143, not 0), and the
    report is noise and dropped: the command says 'interrupted' and nothing else."""
    result = run_code(stop_lost_in_a_finalizer("SIGTERM", "print('ran on')"))
    assert (result.returncode, result.stderr) == (143, "\ninterrupted\n")


def test_a_signal_other_than_a_stop_while_waiting_in_cpp_ends_nothing():
    """stop_signals_end_at_once's watcher hears of every signal with a Python handler (a
    library's SIGUSR1 or a terminal's SIGWINCH, say); only a stop signal ends the process."""
    code = ("import os, signal, time; from common.stop_signals import stop_signals_end_at_once\n"
            "heard = []\n"
            "signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))\n"
            "with stop_signals_end_at_once():\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    time.sleep(0.5)  # the watcher's time to read the signal's byte\n"
            "print('ran on', heard == [signal.SIGUSR1])")
    result = run_code(code)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran on True\n", "")


def test_a_stop_signal_after_a_wait_in_cpp_is_said_in_one_line():
    """Once stop_signals_end_at_once is done, Python must no longer write each signal to its
    closed pipe: a later SIGTERM added 'Exception ignored ... signal wakeup fd' to its line."""
    code = ("import os, signal, sys, time; from common.cli import run_main\n"
            "from common.stop_signals import stop_signals_end_at_once\n"
            "def body():\n"
            "    with stop_signals_end_at_once():\n"
            "        pass\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n"
            "sys.exit(run_main(body))")
    result = run_code(code)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "\ninterrupted\n")


LINES_FOREVER = ("import sys, time; from common.cli import run_main\n"
                 "def body():\n"
                 "    while True:\n"
                 "        print('a line', flush=True)\n"
                 "        time.sleep(0.05)\n"
                 "sys.exit(run_main(body))")


@pytest.mark.parametrize("interrupt, code", [(False, 1), (True, 130)],
                         ids=["| head -1", "2>&1 | tee, and a Ctrl-C"])
def test_an_output_whose_reader_has_gone_ends_the_command_in_one_line(interrupt, code):
    """`| head -1`: 'cannot use: Broken pipe. Check that the path exists, is writable...'.
    `2>&1 | tee` with a Ctrl-C, which ends tee too: exit 1, not 130, as the line saying so
    failed on the same pipe (or 120 for the flush at exit)."""
    proc = subprocess.Popen([sys.executable, "-c", LINES_FOREVER], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if not interrupt
                            else subprocess.STDOUT)
    assert proc.stdout.readline() == b"a line\n"
    proc.stdout.close()  # the reader has gone
    if interrupt:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == code
    if not interrupt:
        assert proc.stderr.read().decode() == (
            "error: stopped: the program reading this command's output (such as head or tee) "
            "closed it; send the output to a file or keep its reader running.\n")
        proc.stderr.close()


# waits for stdout's reader to go, then leaves a line in stdout's buffer for run_main's flush
# (with "error": then fails, the line still buffered)
LINE_AFTER_THE_READER_WENT = ("import select, sys; from common.cli import run_main\n"
                              "from common.errors import DataError\n"
                              "def body():\n"
                              "    watch = select.poll()\n"
                              "    watch.register(1, select.POLLOUT)\n"
                              "    watch.poll(60_000)  # POLLERR: the reader has gone\n"
                              "    print('final test accuracy 94.00%')\n"
                              "    if sys.argv[1:] == ['error']:\n"
                              "        raise DataError('named')\n"
                              "sys.exit(run_main(body))")


def test_a_reader_gone_before_the_last_flush_of_stdout_is_said_as_any_reader_gone():
    """`| head -1` that has gone when run_main flushes what stdout still holds: the same line
    as for a write that failed in the command ('the program reading ... closed it'); had the
    flush's broken pipe been named a failure to write standard output, and stdout pointed at
    /dev/null before run_main looked, it read 'error: ... standard output: Broken pipe'."""
    proc = subprocess.Popen([sys.executable, "-c", LINE_AFTER_THE_READER_WENT], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=buffered_env())
    proc.stdout.close()  # the reader has gone
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read().decode() == (
        "error: stopped: the program reading this command's output (such as head or tee) "
        "closed it; send the output to a file or keep its reader running.\n")
    proc.stderr.close()


def test_an_error_with_output_buffered_for_a_reader_gone_exits_1_not_120():
    """An error while stdout's buffer holds a line for a reader that has gone: its flush in
    run_main fails with a broken pipe, which leaves the line in the buffer, and the
    interpreter's flush at exit failed on it again ('Exception ignored', exit status 120)."""
    proc = subprocess.Popen([sys.executable, "-c", LINE_AFTER_THE_READER_WENT, "error"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=buffered_env())
    proc.stdout.close()  # the reader has gone
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read().decode() == "error: named\n"
    proc.stderr.close()


def test_an_error_whose_stderr_reader_has_gone_still_exits_1():
    """`2>&1 | head`-like: the error line fails on stderr's pipe, whose reader has gone; the
    line left in stderr's buffer then failed again at exit, and Python's exit status for a
    failed flush (120) replaced the error's 1."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from common.cli import run_main\n"
             "from common.errors import DataError\n"
             "def body():\n"
             "    raise DataError('named')\n"
             "sys.exit(run_main(body))"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=write,
            env=buffered_env(), timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 1


def test_a_closed_stdin_is_reopened_for_reading(tmp_path):
    """`0<&-`: stdin is reopened on /dev/null for reading, as a library's prompt (input())
    expects: it reads the end of input, not an 'io.UnsupportedOperation: not readable'."""
    code = ("import sys; from common.cli import run_main\n"
            "def body():\n"
            "    print(repr(sys.stdin.read()))\n"
            "sys.exit(run_main(body))")
    result = run_code(code, preexec_fn=lambda: os.close(0))
    assert (result.returncode, result.stdout, result.stderr) == (0, "''\n", "")


def with_stderr_closed(code: str) -> subprocess.CompletedProcess:
    """`python -c code` started with descriptor 2 closed (`2>&-`)."""
    return run_code(code, preexec_fn=lambda: os.close(2))


def test_a_closed_stderr_is_reopened_on_dev_null(tmp_path):
    """`2>&-`: Python's sys.stderr was None, so the error line raised an AttributeError that
    could not be shown, and the next file opened took descriptor 2."""
    code = ("import os, sys; from common.cli import run_main; from common.errors import "
            "DataError\n"
            "def body():\n"
            f"    fd = os.open({str(tmp_path / 'out')!r}, os.O_WRONLY | os.O_CREAT)\n"
            "    os.write(fd, str(fd).encode())\n"
            "    raise DataError('named')\n"
            "sys.exit(run_main(body))")
    assert with_stderr_closed(code).returncode == 1
    assert (tmp_path / "out").read_text() != "2"


def test_a_file_that_took_the_closed_stderrs_descriptor_keeps_it(tmp_path):
    """`2>&-`, and a file opened before run_main took descriptor 2: stderr is reopened on a
    descriptor of its own, and the file's writes still reach the file."""
    code = ("import os, sys; from common.cli import run_main\n"
            f"fd = os.open({str(tmp_path / 'out')!r}, os.O_WRONLY | os.O_CREAT)\n"
            "def body():\n"
            "    os.write(fd, b'kept')\n"
            "sys.exit(run_main(body))")
    assert with_stderr_closed(code).returncode == 0
    assert (tmp_path / "out").read_text() == "kept"


@pytest.mark.parametrize("code, filename, said", [
    (errno.EACCES, "/some/file", "cannot use /some/file: Permission denied; fix its "
                                 "permissions, or those of the folders above it, or choose "
                                 "another path."),
    (errno.EPERM, "/some/file", "cannot use /some/file: Operation not permitted; fix its "
                                "permissions, or those of the folders above it, or choose "
                                "another path."),
    (errno.EFBIG, "/some/file", "cannot write /some/file: it passes this process's file size "
                                "limit; raise this process's file size limit (`ulimit -f "
                                "unlimited`)."),
    (errno.EFBIG, None, "cannot write: it passes this process's file size limit; raise this "
                        "process's file size limit (`ulimit -f unlimited`)."),
    (errno.EISDIR, "/run/.lock", "cannot use /run/.lock: it is a folder where a file belongs; "
                                 "move it away, or choose another path."),
    (errno.EIO, "/some/file", "cannot use /some/file: Input/output error. Check that the path "
                              "exists, is writable and that its disk has free space."),
], ids=["EACCES", "EPERM", "EFBIG", "EFBIG of no file", "EISDIR", "EIO"])
def test_each_kind_of_os_error_gets_its_own_fix(code, filename, said):
    """EPERM (chattr +i, a mount that refuses the operation) is a matter of permissions as
    much as EACCES; past the file size limit, free space would not help; a folder where a
    file belongs is named so: none is the catch-all advice to check that the path exists and
    the disk has space."""
    from common.cli import error_text

    assert error_text(OSError(code, os.strerror(code), filename)) == said


def test_other_unraisable_errors_reach_the_hook_in_place_when_run_main_starts(monkeypatch):
    """run_main hides only the lost stop signal; the rest goes to the hook of the moment
    (pytest's, a user's), not to the one present when common.cli was imported."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable))

    class FailsWhenCollected:
        def __del__(self) -> None:
            raise ValueError("from a finalizer")

    def body() -> None:
        FailsWhenCollected()

    assert run_main(body) == 0
    assert [type(u.exc_value) for u in seen] == [ValueError]


@pytest.mark.parametrize("module, args", [("tools.report", ["ckpt.pt"]),
                                          ("tools.export", ["ckpt.pt", "--format", "onnx"]),
                                          ("tools.bench", [])])
def test_an_empty_data_dir_is_refused_not_read_as_the_current_folder(module, args, capsys):
    """Path('') is '.', so `--data-dir ""` (an unset shell variable) would write into the
    current folder: every tool with --data-dir refuses it, as training does."""
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).parse_args([*args, "--data-dir", ""])
    assert stop.value.code == 2
    assert "an empty value would write the data into the current directory" in \
        capsys.readouterr().err


@pytest.mark.parametrize("module, args", [("tools.report", ["ckpt.pt"]),
                                          ("tools.predict", ["ckpt.pt", "a.png"]),
                                          ("tools.bench", [])])
def test_a_device_left_out_is_the_best_one_here_as_the_help_says(module: str,
                                                                   args: list[str]) -> None:
    """--device left out is None, for pick_device to choose: CUDA where a GPU is (--help: "default:
    cuda when available"). A default of "cpu" would run every tool on a GPU machine's CPU, which
    a CPU-only host cannot tell from the best device."""
    import torch

    given = importlib.import_module(module).parse_args(args).device
    assert given is None
    assert pick_device(given) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("parse, args, option", [
    ("engine.options.parse", ["--out", ""], "--out"),
    ("engine.options.parse", ["--out", "  "], "--out"),
    ("engine.options.parse", ["--resume", ""], "--resume"),
    ("tools.report.parse_args", ["ckpt.pt", "--out", ""], "--out"),
    ("tools.export.parse_args", ["ckpt.pt", "--out", ""], "--out"),
    ("tools.predict.parse_args", ["ckpt.pt", "a.png", "--cam", ""], "--cam"),
    ("tools.bench_options.parse_args", ["--json", ""], "--json"),
    ("tools.bench_options.parse_args", ["--trace", ""], "--trace"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(parse, args, option, capsys):
    """`--out ""` (an unset shell variable) was a timestamped run folder for training, and the
    current folder for the tools (Path('') is '.'): every path option refuses it."""
    module, name = parse.rsplit(".", 1)
    with pytest.raises(SystemExit) as stop:
        getattr(importlib.import_module(module), name)(args)
    assert stop.value.code == 2
    assert f"argument {option}: an empty value would " in capsys.readouterr().err


def test_the_command_line_offers_the_choices_a_saved_config_is_checked_against():
    """engine.config.CHOICES, which foreign_values checks a checkpoint's config against, is
    every list of names the command line offers, in its order (the order of the messages)."""
    from engine.config import CHOICES
    from engine.options import build_parser

    offered = {a.dest: tuple(a.choices) for a in build_parser()._actions
               if a.choices and a.dest != "help"}
    assert offered == CHOICES and list(offered) == list(CHOICES)


def test_train_help_gives_each_option_its_preset_value():
    """--help named no value for --epochs, --lr and the like (only 'from --preset'): each now
    says the fast preset's, and the seed preset's where it differs."""
    from engine.options import build_parser

    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["epochs"] == "training epochs (default: 24; --preset seed: 20)"
    assert helps["lr"].endswith("(default: 0.2; --preset seed: 0.01)")
    assert helps["weight_decay"].endswith("(default: 0.0005; --preset seed: 0)")
    assert helps["flip"].endswith("(default: on)") and helps["seed"].endswith("(default: 0)")
    assert helps["tta"].endswith("(default: on; --preset seed: off)")
    assert helps["translate"].endswith("(default: 2; --preset seed: 4)")
    assert helps["pad_mode"].endswith("(default: reflect; --preset seed: zeros)")
    assert helps["loader"] == "default: resident on GPU, ffcv on CPU"  # its own words, kept
    # an option whose help names its default already is given no second one
    assert helps["preset"] == ("starting values; any option given here overrides them "
                               "(default: fast)")
    assert all(text.count("(default:") <= 1 for text in helps.values() if text), helps


@pytest.mark.parametrize("tool, decided", [("lr_find", ["--lr", "--epochs", "--schedule"]),
                                           ("compare", ["--optimizer", "--lr",
                                                        "--weight-decay"])])
def test_the_tools_help_gives_preset_values_but_for_the_options_they_decide(tool, decided,
                                                                            capsys):
    """lr_find and compare gave no value for any training option; they now give the preset's
    for those they take from it (--width, --batch-size), and none for those they set or refuse
    themselves (the sweep's LR, compare's per-optimizer LR and weight decay)."""
    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    assert "--width WIDTH channels of the first stage; 64 is ResNet-18 (default: 64)" in shown
    assert "--batch-size BATCH_SIZE images per step on each process (default: 512; " in shown
    for option in decided:
        text = shown.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert "(default:" not in text, (option, text)


@pytest.mark.parametrize("script, refused, why", [
    ("tools/lr_find.py", ["--lr LR", "--epochs EPOCHS", "--schedule {", "--warmup WARMUP",
                          "--tta, --no-tta", "--log-with TRACKER"],
     "the range test does not use it (it sweeps the LR from --start-lr to --end-lr over "
     "--iterations steps and never evaluates); pass it to engine/train.py"),
    ("tools/compare.py", ["--optimizer {"], "this tool trains each of --optimizers"),
])
def test_the_tools_help_says_which_training_options_they_refuse(script, refused, why):
    """lr_find's --help described --lr, --epochs, ... as engine/train.py takes them ('peak
    learning rate, or 'auto' for the LR range test'), and compare's --optimizer as 'optimizer',
    where both tools refuse them (docs/lr-and-optimizers.md); the help now says so, and why."""
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    for option in refused:
        after = shown[shown.index(" " + option) + 1:]
        described = after[after.index("}") + 1 if option.endswith("{") else len(option):]
        assert described.lstrip().startswith(f"refused here: {why}"), (option, described[:80])
    assert "--momentum MOMENTUM momentum (SGD, RMSprop)" in shown  # one it takes, as training


def test_lr_finds_help_gives_both_limits_of_iterations():
    """--help said '(default: 100; at least 20)' where --iterations over 100,000 is refused too
    (docs/lr-and-optimizers.md names both limits)."""
    result = run_script("tools/lr_find.py", "--help")
    shown = " ".join(result.stdout.split())
    assert "(default: 100; at least 20, at most 100,000)" in shown, shown[-400:]
    refused = run_script("tools/lr_find.py", "--iterations", "100001")
    assert refused.returncode == 2 and "at most 100,000" in refused.stderr, refused.stderr


@pytest.mark.parametrize("tool, decided, own", [
    ("lr_find", "REFUSED_OPTIONS", ["--iterations", "50"]),
    ("compare", "DECIDED", ["--optimizers", "sgd"])])
def test_a_tools_run_folder_left_out_is_named_after_it_to_the_second(tool, decided, own):
    """parse_tool_args: no --out is runs/<tool>-<date>-<time to the second> (a training run's
    is named after its dataset), so runs a minute apart get folders of their own; an --out
    given is kept, beside an option of the tool's own, which the training options' parse
    never sees."""
    from engine.options import parse_tool_args

    module = importlib.import_module(f"tools.{tool}")

    def out(*argv: str) -> str:
        return parse_tool_args(list(argv), f"tools/{tool}.py", None, module.own_options(),
                               module.check, getattr(module, decided))[1].out

    assert re.fullmatch(rf"runs/{tool}-\d{{8}}-\d{{6}}", out()), out()
    assert out(*own, "--out", "runs/mine") == "runs/mine"


def test_options_given_with_a_preset_override_its_values():
    """--preset gives the starting values; an option typed beside it wins, and the preset's
    other values stay."""
    from engine.config import PRESETS
    from engine.options import parse

    seed = PRESETS["seed"]
    cfg = parse(["--preset", "seed", "--lr", "0.05", "--epochs", "3", "--tta"]).cfg
    assert (cfg.preset, cfg.lr, cfg.epochs, cfg.tta) == ("seed", 0.05, 3, True)
    assert (cfg.lr, cfg.epochs, cfg.tta) != (seed["lr"], seed["epochs"], seed["tta"])
    assert (cfg.optimizer, cfg.schedule, cfg.batch_size, cfg.pad_mode) == (
        seed["optimizer"], seed["schedule"], seed["batch_size"], seed["pad_mode"])


@pytest.mark.parametrize("option, message", [
    (["--synthetic-size", "100", "10"], "--synthetic-size is for --dataset synthetic, not cifar10"),
    (["--dataset", "folder", "--synthetic-size", "100", "10"],
     "--synthetic-size is for --dataset synthetic, not folder"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "99999999999"], "--workers 99999999999: this process may use "),
    (["--width", "0"], "--width must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    # past it, the model's build was a RuntimeError traceback (torch's storage size overflowed)
    (["--width", "63270844"], "--width must be at most 63270843 (a wider model's largest weight "
                              "has more bytes than torch can count), got 63270844"),
    (["--seed", "4294967296"], "--seed must be in 0..4294967295, got 4294967296"),
    (["--log-with", "nope"], "argument --log-with: invalid choice: 'nope' (choose from "),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1), got -0.1"),
    (["--warmup", "1"], "--warmup must be in [0, 1), got 1.0"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--schedule", "cosine", "--warmup", "0.1"],
     "--warmup is for --schedule onecycle or triangular; cosine has no warm-up"),
    (["--schedule", "step", "--warmup", "0.1"], "step has no warm-up, leave --warmup out"),
    (["--preset", "seed", "--warmup", "0.1"], "constant has no warm-up, leave --warmup out"),
    (["--translate", "0", "--pad-mode", "zeros"],
     "--pad-mode pads for --translate, which is 0; leave --pad-mode out"),
    (["--deterministic", "--cudnn-benchmark"],
     "--cudnn-benchmark times cuDNN's algorithms, which --deterministic rules out"),
    (["--no-compile", "--compile-mode", "max-autotune"],
     "--compile-mode max-autotune compiles; drop --no-compile"),
])
def test_values_out_of_range_or_of_no_use_are_refused(option, message, capsys):
    """Momentum 1 never forgets a gradient (SGD takes it and runs away); a whole-run warm-up
    leaves no step to decay in; synthetic sizes would do nothing for another dataset, nor
    --warmup for a schedule without a warm-up (cosine trained at the peak LR from its first
    step), nor --pad-mode without --translate, nor --cudnn-benchmark in a --deterministic run
    (which would train untuned), nor --compile-mode beside --no-compile; more workers than
    cores, a width of 0 and a tracker accelerate lacks neither: refused as usage errors, before
    any work. Each refusal is the one line CommandParser gives a usage error."""
    from engine.options import parse

    with pytest.raises(SystemExit) as stop:
        parse(option)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert err.startswith("engine/train.py: error: ") and err.endswith("; see --help\n"), err
    assert err.count("\n") == 1, err


def assert_taken_as_typed(option: list[str], given: dict) -> None:
    """`option` parses with no usage error (SystemExit), and the values typed are the run's."""
    from engine.options import parse

    options = parse(option)
    assert options.given == given
    assert {name: getattr(options.cfg, name) for name in given} == given


@pytest.mark.parametrize("option, given", [
    (["--schedule", "onecycle", "--warmup", "0.3"], dict(schedule="onecycle", warmup=0.3)),
    (["--warmup", "0"], dict(warmup=0.0)), (["--schedule", "cosine"], dict(schedule="cosine")),
    (["--pad-mode", "zeros"], dict(pad_mode="zeros")), (["--translate", "0"], dict(translate=0)),
    (["--preset", "seed", "--pad-mode", "reflect"], dict(preset="seed", pad_mode="reflect")),
    (["--deterministic", "--no-cudnn-benchmark"],
     dict(deterministic=True, cudnn_benchmark=False)),
    (["--no-deterministic", "--cudnn-benchmark"],
     dict(deterministic=False, cudnn_benchmark=True)),
    (["--compile-mode", "max-autotune"], dict(compile_mode="max-autotune", compile=True)),
    (["--compile-mode", "default"], dict(compile_mode="default"))])
def test_warmup_and_pad_mode_are_taken_where_they_act(option, given):
    """--warmup beside a schedule that warms up, --pad-mode beside a translate, and
    --cudnn-benchmark without --deterministic are taken like any option; a schedule without a
    warm-up is fine while --warmup is left out, and --translate 0 while --pad-mode is. A
    compile mode asks for compiling, but for the default one, which leaves it to the device
    (eager on the CPU)."""
    assert_taken_as_typed(option, given)


@pytest.mark.parametrize("option, value", [
    (["--lr", "3.4028234663852886e38"], dict(lr=3.4028234663852886e38)),
    (["--lr", "1e-30"], dict(lr=1e-30)), (["--lr", "auto"], dict(lr="auto")),
    (["--label-smoothing", "0"], dict(label_smoothing=0.0)),
    (["--momentum", "0"], dict(momentum=0.0)),
    (["--weight-decay", "0"], dict(weight_decay=0.0)), (["--workers", "1"], dict(workers=1)),
    (["--weight-decay", "3.4028234663852886e38"], dict(weight_decay=3.4028234663852886e38)),
    (["--seed", "4294967295"], dict(seed=4294967295)),
    (["--width", "63270843"], dict(width=63270843)),
    (["--translate", "16", "--cutout", "32"], dict(translate=16, cutout=32))])
def test_the_edges_of_each_range_are_taken(option, value):
    """The values at the closed ends of the ranges the messages quote (the largest float32 LR
    and weight decay, no smoothing, momentum or decay, one worker, the last seed, the widest
    model, the largest shift and cutout) and --lr auto are options like any other, taken as
    typed."""
    assert_taken_as_typed(option, value)


def test_options_checked_against_a_new_runs_config_are_left_to_the_resume():
    """With --resume the run's saved config decides (engine.resume): --synthetic-size is not
    refused for the preset's cifar10, the saved dataset being the one it is checked against."""
    from engine.options import parse

    options = parse(["--resume", "runs/x", "--synthetic-size", "100", "10"])
    assert options.given == {"synthetic_size": (100, 10)}


def test_a_saved_config_of_other_types_than_the_command_lines_is_named():
    """foreign_values, the check of a damaged or edited ckpt.pt config: an int is a float (a
    hand-written lr 1), a bool is neither (true for a momentum), a tuple has its length, and an
    lr of a word other than 'auto' is named by validate, never compared with 0 (a TypeError)."""
    from engine.config import TrainConfig, foreign_values, validate

    assert foreign_values(TrainConfig(lr=1, weight_decay=0, momentum=0, warmup=0)) == []
    assert foreign_values(TrainConfig(momentum=True)) == ["momentum is True, not <class 'float'>"]
    assert foreign_values(TrainConfig(synthetic_size=[100, 10, 5])) == [
        "synthetic_size is (100, 10, 5), not tuple[int, int]"]
    assert foreign_values(TrainConfig(lr="fast")) == []  # a str, as "auto" is
    assert validate(TrainConfig(lr="fast")) == [
        "--lr must be a positive finite number no larger than 3.4e+38 (the float32 weights' "
        "largest) or 'auto', got fast"]


def test_every_tracker_accelerate_names_is_taken_by_log_with_and_in_a_saved_config():
    """--log-with's choices and a saved config's log_with are accelerate's own tracker names,
    all of them: only a name accelerate lacks is refused (a name left out of the list would
    refuse a tracker accelerate runs, wandb or mlflow, as a usage error or a foreign value)."""
    from accelerate.utils import LoggerType

    from engine.config import TrainConfig, foreign_values
    from engine.options import parse

    for name in (t.value for t in LoggerType):
        assert parse(["--log-with", name]).cfg.log_with == name
        assert foreign_values(TrainConfig(log_with=name)) == []


def test_pad_mode_reaches_the_augmentation_as_zero_or_reflect_padding():
    """--pad-mode zeros (and the seed preset's) reaches the augmentation as zero padding,
    reflect (the default) as reflection; the pixels each pads with are test_augment's."""
    from engine.options import parse

    assert not parse(["--pad-mode", "zeros"]).cfg.augment().reflect
    assert not parse(["--preset", "seed"]).cfg.augment().reflect
    assert parse([]).cfg.augment().reflect


FULL_STDOUT_LINE = ("the disk is full writing standard output; free some space or write to "
                    "another disk.")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_help_on_a_full_disk_says_so_and_exits_1(unbuffered):
    """`--help > /dev/full`: argparse dropped the write's error and exited 0 with no help
    written (or 120 with 'Exception ignored' lines where Python flushed stdout at exit)."""
    env = buffered_env() | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), "--help"],
                                cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True,
                                env=env, timeout=120)
    assert (result.returncode, result.stderr) == (
        1, f"python tools/report.py: error: {FULL_STDOUT_LINE}\n")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_help_whose_reader_has_gone_ends_quietly_with_exit_status_0(unbuffered):
    """`--help | head -1`: the reader took what it wanted; the help's broken pipe is no
    failure, so no error line and exit 0, as argparse's own help would end (a failure to
    write --help is exit 1 only where the help could not be written at all, a full disk)."""
    env = buffered_env() | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    try:
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), "--help"],
                                cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True,
                                env=env, timeout=120)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")


def test_help_asked_for_in_a_file_of_the_callers_is_written_there(capsys):
    """CommandParser.print_help writes stdout's help itself (a full disk said in one line);
    given a file, as argparse's is, it writes there and not to stdout."""
    import io

    from engine.options import build_parser

    parser = build_parser()
    buffer = io.StringIO()
    parser.print_help(buffer)
    assert buffer.getvalue() == parser.format_help() and capsys.readouterr().out == ""


def test_output_a_full_disk_refuses_at_exit_is_said_with_exit_status_1():
    """What a command printed last sat in stdout's buffer until Python flushed it at exit: on a
    full disk that was exit status 120 and 'Exception ignored' lines, the work looking done."""
    code = ("import sys; from common.cli import run_main\n"
            "sys.exit(run_main(lambda: print('final test accuracy 94.00%')))")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, env=buffered_env(),
                                timeout=120)
    assert (result.returncode, result.stderr) == (1, f"error: {FULL_STDOUT_LINE}\n")


def test_output_left_in_stdouts_buffer_by_an_error_does_not_fail_again_at_exit():
    """An error while the buffer holds lines a full disk refuses: its own line and exit status
    1, not 120 from the interpreter's flush failing after it."""
    code = ("import sys; from common.cli import run_main\n"
            "from common.errors import DataError\n"
            "def body():\n"
            "    print('epoch 1')\n"
            "    raise DataError('named')\n"
            "sys.exit(run_main(body))")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, env=buffered_env(),
                                timeout=120)
    assert (result.returncode, result.stderr) == (1, "error: named\n")


STOPPED_TWICE = ("import os, signal, sys, time; from common.cli import run_main\n"
                 "def body():\n"
                 "    try:\n"
                 "        os.kill(os.getpid(), signal.SIGTERM)  # the stop\n"
                 "        time.sleep(60)\n"
                 "    except KeyboardInterrupt:\n"
                 "        os.kill(os.getpid(), signal.SIGTERM)  # again, as the stop is said\n"
                 "        time.sleep(0.5)\n"
                 "        print('said what was kept')\n"
                 "        raise\n"
                 "sys.exit(run_main(body))")


@pytest.mark.parametrize("launched", [True, False], ids=["under torchrun", "plain python"])
def test_a_launched_processs_second_sigterm_is_the_same_stop(launched):
    """torchrun killed outright: Linux's parent-death signal came once per launcher thread the
    process was handed to, and the second SIGTERM cut short process 0's account of what was
    kept ('ckpt.pt holds the last epoch saved', not the epoch). Under a launcher the second is
    the same stop; run by hand, a second SIGTERM still stops whatever is under way."""
    from common.hardware import LAUNCHED

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHED}
    result = run_code(STOPPED_TWICE, env={**env, LAUNCHED[0]: "test"} if launched else env)
    assert result.returncode == 143, result.stderr
    assert ("said what was kept" in result.stdout) == launched, result.stdout


def test_counts_are_worded_in_the_singular_only_for_one():
    """Every command's counts ('1 epoch', '2 processes', 'the links') come from one rule."""
    from common.wording import counted, noun

    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert counted(1, "process", "processes") == "1 process"
    assert counted(3, "process", "processes") == "3 processes"
    assert (noun(1, "link"), noun(2, "link")) == ("link", "links")
    assert (noun(1, "it", "them"), noun(2, "it", "them")) == ("it", "them")


ONE_CORE = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from common.hardware import beyond_cores
print(beyond_cores("--workers", 3))
"""


def test_a_process_on_one_core_is_told_of_one_core():
    """--workers beyond the cores, in a process allowed one core (taskset -c 0, a container's
    one CPU): '1 core' and 'pass --workers 1', not '1 cores' and 'or fewer'. Any machine's
    tests see it, not only a one-core one's."""
    result = run_code(ONE_CORE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--workers 3: this process may use 1 core; pass --workers 1\n"

"""engine/train.py and the tools under faults and hostile input: a second run into one folder,
--resume with other options or from elsewhere, divergence, a full disk, Ctrl-C at awkward
moments, and impossible values. Real subprocesses on tiny synthetic data (CPU)."""

from __future__ import annotations

import ast
import errno
import math
import os
import pickle
import pty
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    SignalsWhenCollected,
    cpu_out_of_memory,
    data_workers,
    ended_pid,
    in_process,
    run_code,
    run_script,
    small_run,
    tmpfs,
    torchrun_env,
    tree,
    wait_until,
    write_cifar10,
    write_tree,
)

from common.allocator import allocator_problem
from common.cli import run_main
from common.errors import (
    CheckpointError,
    EngineError,
    RunFailed,
    TrainingError,
    listing,
    one_line,
    plain_line,
)
from engine import checkpoint, loop
from engine.config import TrainConfig
from engine.failures import out_of_memory, out_of_memory_as, peer_gone
from engine.history import read_history
from engine.loop import configure
from engine.loop import train as train_run
from engine.model import build_model
from engine.run import train_step
from engine.train import main as train_main
from loaders import layouts, make_loader
from loaders.options import seed_problem
from loaders.preparation import prepare
from tools import export as export_command
from tools import predict as predict_command
from tools import report as report_command

SPLIT = (1024, 128)  # synthetic training and test images
SIZE = ["--synthetic-size", *map(str, SPLIT)]
TINY = ["--dataset", "synthetic", *SIZE, "--width", "8", "--batch-size", "128",
        "--loader", "resident", "--seed", "1"]


def train(*args, **kwargs) -> subprocess.CompletedProcess:
    return run_script("engine/train.py", *TINY, *args, **kwargs)


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    """A run of data_dir's prepared split (SPLIT) for train_run in this process: width 8,
    batches of 256, the resident loader, one worker, one epoch; `changes` on top."""
    return TrainConfig(**{**dict(dataset="synthetic", data_dir=str(data_dir),
                                 synthetic_size=SPLIT, width=8,
                                 batch_size=256, loader="resident", workers=1, epochs=1,
                                 out=str(out)), **changes})


def diverged(cfg: TrainConfig) -> str:
    """The message of an in-process run that must stop as diverged (RunFailed), having saved
    no ckpt.pt or best.pt."""
    with pytest.raises(RunFailed) as refused:
        train_run(cfg)
    assert not (Path(cfg.out) / "ckpt.pt").exists() and not (Path(cfg.out) / "best.pt").exists()
    return str(refused.value)


def start(*args) -> subprocess.Popen:
    """engine/train.py in the background, its output piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "engine" / "train.py"), *TINY, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lock_holder(lock: Path) -> str:
    """The pid a run's .lock names, or "" while it is missing or not yet written."""
    with suppress(FileNotFoundError):
        return lock.read_text()
    return ""


# a progress line, printed every 30 s where stderr is no terminal (common.progress.LineProgress):
# an epoch of a test's run on a loaded host can take that long
PROGRESS_LINE = re.compile(r"[^:]+: \d+/\d+ \w+")


def one_line_error(result) -> str:
    """stderr of a failed run: one paragraph, no traceback (progress lines aside)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic split of SPLIT, prepared as loaders/prepare.py prepares it, in this process
    (that command's own tests run it as a process)."""
    path = tmp_path_factory.mktemp("data")
    prepare("synthetic", path, SPLIT, workers=1)
    return path


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train("--data-dir", data_dir, "--epochs", "1", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr  # not a terminal: progress as lines, not tqdm refreshes
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# --- the run folder ---------------------------------------------------------------------------


def test_a_second_ctrl_c_while_the_checkpoint_is_read_keeps_the_resume_line(finished,
                                                                            tmp_path):
    """Two Ctrl-Cs in a row: the second landed as stopped() read ckpt.pt to count its epochs,
    and the command said only 'interrupted', not where the run was kept."""
    run = copy_run(finished, tmp_path)

    def second_ctrl_c(path):  # as the second signal arrives while the file is read
        signal.raise_signal(signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.checkpoint, "load", second_ctrl_c)
        kept = loop.stopped(SimpleNamespace(is_main_process=True), run)
    assert str(kept) == f"{run}/ckpt.pt holds the last epoch saved; continue with --resume {run}"
    assert str(loop.stopped(SimpleNamespace(is_main_process=True), run)) == (
        f"{run}/ckpt.pt holds epoch 1; continue with --resume {run}")


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused(data_dir, tmp_path):
    """The refusal names the process holding the folder. The first run has epochs enough to
    outlast the second's start (torch's import alone takes seconds), and is waited on until
    its lock names it: the pid is written just after the lock is taken."""
    out = tmp_path / "out"
    first = start("--data-dir", str(data_dir), "--epochs", "100", "--out", str(out))
    try:
        wait_until(lambda: lock_holder(out / ".lock") == str(first.pid), 300,
                   "the run never locked", process=first, interval=0.05)
        second = train("--data-dir", data_dir, "--epochs", "1", "--out", out, timeout=300)
        assert second.returncode == 1
        assert f"{out} is in use by another run (process {first.pid})" in one_line_error(second)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["engine/train.py", "tools/lr_find.py"])
def test_an_out_that_is_a_file_is_refused_before_any_work(script, tmp_path):
    out = tmp_path / "file"
    out.write_text("not a folder")
    data = tmp_path / "data"
    result = run_script(script, *TINY, "--data-dir", data, "--out", out, timeout=300)
    assert result.returncode == 1
    assert f"--out {out} is a file, not a folder" in one_line_error(result)
    assert not data.exists()  # refused before the data was made
    assert out.read_text() == "not a folder"


# --- the environment a command meets: variables, limits, interpreter, cores -------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", ["abc", "0", "", "²"])
def test_a_world_size_that_is_no_count_is_refused_by_name(value, tmp_path):
    """WORLD_SIZE left over in a shell (torchrun and accelerate launch set it) ended in a
    ValueError's traceback; so did a digit int() reads no value from ('²', a superscript)."""
    out, data = tmp_path / "run", tmp_path / "data"
    result = train("--data-dir", data, "--out", out, timeout=300,
                   env={**os.environ, "WORLD_SIZE": value})
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        f"error: WORLD_SIZE={value!r} is not a number of processes: torchrun and accelerate "
        "launch set it; unset it (`unset WORLD_SIZE`) for a one-process run.")
    assert not out.exists() and not data.exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["2", "-1"])
def test_a_rank_of_no_process_of_the_world_size_is_refused_by_name(rank, tmp_path):
    """A process started by hand (srun-style variables) with a RANK outside 0..WORLD_SIZE-1
    waited in the rendezvous for ever: no set of peers can complete it."""
    out, data = tmp_path / "run", tmp_path / "data"
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    result = train("--data-dir", data, "--out", out, timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        f"error: RANK={rank!r} is no process of WORLD_SIZE=2 (0 to 1): torchrun and accelerate "
        "launch set both; give each process its own RANK in that range, or unset both for a "
        "one-process run.")
    assert not out.exists() and not data.exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "abc"])
def test_a_numba_thread_count_that_is_no_count_is_refused_by_name(value, tmp_path):
    """numba reads NUMBA_NUM_THREADS as FFCV imports it: 0 was a traceback from inside that
    import, 'abc' a warning with a traceback in it before the run went on."""
    out, data = tmp_path / "run", tmp_path / "data"
    result = train("--out", out, "--data-dir", data, timeout=300,
                   env={**os.environ, "NUMBA_NUM_THREADS": value})
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result).startswith(
        f"error: NUMBA_NUM_THREADS={value!r} is not a number of threads: numba (FFCV's compiler) "
        "needs a whole number of at least 1; unset it")
    assert not out.exists() and not data.exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.parametrize("name, value, words", [
    ("NUMBA_THREADING_LAYER", "garbage", "is no threading layer numba (FFCV's compiler) knows"),
    ("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb", "is not an order of numba's three threading "
                                                  "layers"),
])
def test_a_numba_threading_layer_numba_does_not_know_is_refused_by_name(name, value, words,
                                                                        tmp_path):
    """numba reads them as its threads start, in FFCV's first epoch: a ValueError traceback;
    then, refused as FFCV was imported, after the data had been fetched and partly written."""
    out, data = tmp_path / "run", tmp_path / "data"
    result = train("--out", out, "--data-dir", data, timeout=300, env={**os.environ, name: value})
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result).startswith(f"error: {name}={value!r} {words}")
    assert not data.exists()
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, value, error, fix", [
    ("LOCAL_RANK", "x", "invalid literal for int() with base 10: 'x'", "it"),
    ("ACCELERATE_USE_CPU", "maybe", "invalid truth value maybe", "the one it cannot read"),
])
def test_a_launch_variable_accelerate_cannot_read_is_named(name, value, error, fix, tmp_path):
    """accelerate's own words name the value, not the variable it came from."""
    out = tmp_path / "run"
    result = train("--out", out, timeout=300, env={**os.environ, name: value})
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        f"error: {error} (accelerate reads {name}={value!r} from the environment: correct or "
        f"unset {fix})")
    assert not out.exists()


@pytest.mark.slow
def test_an_omp_num_threads_accelerate_cannot_read_is_named_under_torchrun(tmp_path):
    """accelerate reads OMP_NUM_THREADS with int() in a CPU run of several processes: 'abc'
    (which one process runs with) was blamed on the launch variables, none of them 'abc'. Each
    process says it, unless torchrun ended the other first, once one had exited."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(ROOT / "engine" / "train.py"), *TINY, "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=300,
        env={**torchrun_env(tmp_path), "OMP_NUM_THREADS": "abc"})
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) in (1, 2) and set(lines) == {
        "error: invalid literal for int() with base 10: 'abc' (accelerate reads "
        "OMP_NUM_THREADS='abc' from the environment: correct or unset it)"}, lines
    assert not out.exists()


@pytest.mark.parametrize("name, value", [("PYTORCH_CUDA_ALLOC_CONF", "garbage"),
                                         ("PYTORCH_ALLOC_CONF", "max_split_size_mb:1:2")])
def test_an_allocator_setting_torch_aborts_on_is_named_before_torch_loads(name, value,
                                                                          tmp_path):
    """torch's core libraries parse it as they load: a failed C++ assertion, a core dump and
    exit 134, with no word of which setting it was."""
    out = tmp_path / "run"
    result = train("--out", out, timeout=120, env={**os.environ, name: value}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result).startswith(
        f"error: torch aborts as it loads with the allocator setting {name}={value!r} (")
    assert one_line_error(result).endswith("expandable_segments:True, say), or unset it.")
    assert sorted(tmp_path.iterdir()) == []  # no run folder, and no core file of the probe's


@pytest.mark.parametrize("value, told", [("garbage", False), ("help", True), ("+help", True)])
def test_a_torch_logs_setting_torch_refuses_is_named_in_one_line(value, told, tmp_path):
    """torch parses TORCH_LOGS as it loads and raises a ValueError: a traceback ending in pages
    of log names (TORCH_LOGS=help: its help text, raised the same way), with no run made."""
    out = tmp_path / "run"
    result = train("--out", out, timeout=120, env={**os.environ, "TORCH_LOGS": value},
                   cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    if told:  # the help asked for comes first, then the line saying nothing ran
        assert "TORCH_LOGS Info" in result.stderr
        assert last == (f"error: TORCH_LOGS={value!r} prints torch's log names (above) and "
                        "runs nothing; unset it to run the command.")
    else:
        assert one_line_error(result) == (
            "error: torch cannot load with TORCH_LOGS='garbage': it is no comma-separated list "
            "of torch's log names (TORCH_LOGS=help lists them); correct it, or unset it.")
    assert not out.exists()


@pytest.mark.parametrize("torch_logs", [None, "dynamo"], ids=["alone", "beside TORCH_LOGS"])
def test_another_setting_torch_refuses_as_it_loads_is_one_line_naming_it(torch_logs, tmp_path):
    """PYTORCH_JIT=abc, refused by torch.jit as torch loads, ended the command in a ValueError
    traceback; it is one line with torch's words, and beside a valid TORCH_LOGS it is not
    blamed on that (only torch's log-settings parser's ValueError is TORCH_LOGS')."""
    env = {**os.environ, "PYTORCH_JIT": "abc"} | ({"TORCH_LOGS": torch_logs} if torch_logs else {})
    result = train("--out", tmp_path / "run", timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        "error: torch cannot load: Unknown setting of PYTORCH_JIT. Try using 0 or 1. Correct or "
        "unset the environment variable it names.")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("below", ["", "cache"])
def test_an_inductor_cache_dir_that_is_a_file_is_named_before_torch_loads(below, tmp_path):
    """torch._dynamo makes TORCHINDUCTOR_CACHE_DIR as it loads: every run failed on 'cannot use
    PATH: File exists. Check that the path exists...', an eager one too, naming no variable."""
    afile, out = tmp_path / "afile", tmp_path / "run"
    afile.write_text("x")
    cache = afile / below if below else afile
    result = train("--out", out, timeout=120,
                   env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        f"error: TORCHINDUCTOR_CACHE_DIR={str(cache)!r}: {afile} is a file, not a folder; torch "
        "makes its cache there as it loads. Point it at a folder (it is created when missing), "
        "or unset it.")
    assert not out.exists()


def test_an_inductor_cache_dir_below_a_device_names_the_device(monkeypatch):
    """/dev/null/cache: the device is said to be one, not 'a file' (cache_folder_problem)."""
    from common.torch_environment import cache_folder_problem
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/dev/null/cache")
    assert cache_folder_problem().startswith(
        "TORCHINDUCTOR_CACHE_DIR='/dev/null/cache': /dev/null is a device, pipe or socket, not a "
        "folder; torch makes its cache there as it loads.")


def test_a_deleted_current_folder_is_said_in_one_line(tmp_path):
    """Started in a folder deleted meanwhile, every command ended in 'Intel oneMKL FATAL ERROR:
    Cannot load .../libtorch_cpu.so.' and exit 2 as torch loaded, which named no folder."""
    gone, out = tmp_path / "gone", tmp_path / "run"
    gone.mkdir()
    command = " ".join(map(shlex.quote, [sys.executable, str(ROOT / "engine" / "train.py"),
                                         *TINY, "--out", str(out)]))
    result = subprocess.run(["bash", "-c", f'cd "$1" && rmdir "$1" && exec {command}', "-",
                             str(gone)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result) == (
        "error: the current folder was deleted, and torch cannot load from it; cd to a folder "
        'that exists (`cd "$PWD"` if it was made again) and run the command again.')
    assert not out.exists()


def test_an_address_space_limit_torch_cannot_load_under_is_said_in_one_line(tmp_path):
    """Under `ulimit -v 1000000`, torch's libraries do not fit: an ImportError traceback
    ('libtorch_cpu.so: failed to map segment from shared object') that named no limit."""
    out = tmp_path / "run"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1_000_000 * 1024, resource.RLIM_INFINITY))

    result = train("--out", out, timeout=120, cwd=tmp_path, preexec_fn=limited)
    assert result.returncode == 1, result.stderr[-2000:]
    line = one_line_error(result)
    assert line.startswith("error: torch cannot load under this process's address-space limit "
                           "(ulimit -v 1000000 KiB: libtorch"), line
    # the library that did not fit, by name: glibc's own words after it are said as the cause
    assert re.search(r"KiB: libtorch\w*\.so does not fit\); raise it", line), line
    assert line.endswith("raise it (`ulimit -v unlimited`; torch takes several GiB of address "
                         "space) and run again.")
    assert not out.exists()


def test_a_missing_package_under_an_address_space_limit_is_not_blamed_on_the_limit(tmp_path):
    """Under a generous `ulimit -v` (as clusters set), an import that fails for another reason
    (here accelerate missing) is not said to be torch not fitting under the limit: its own
    error, naming the package, is what the user needs."""
    gone = tmp_path / "site" / "accelerate"
    gone.mkdir(parents=True)
    (gone / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'accelerate'\", name='accelerate')\n")

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (64 << 30, resource.RLIM_INFINITY))

    result = train("--out", tmp_path / "run", timeout=120, cwd=tmp_path, preexec_fn=limited,
                   env={**os.environ, "PYTHONPATH": f"{gone.parent}{os.pathsep}{ROOT}"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "No module named 'accelerate'" in result.stderr, result.stderr[-2000:]
    assert "address-space" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_file_size_limit_is_named_as_the_fix_not_free_space(finished, tmp_path):
    """Under `ulimit -f`, an export past the limit said 'Check that the path exists, is
    writable and that its disk has free space', on a disk with gigabytes free; it is now told
    to raise the limit, and leaves nothing. (A checkpoint past it:
    test_a_full_disk_while_saving_the_checkpoint_is_a_clear_error.)"""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, resource.RLIM_INFINITY))

    fix = "raise this process's file size limit (`ulimit -f unlimited`)"
    onnx = tmp_path / "model.onnx"
    export = run_script("tools/export.py", finished / "ckpt.pt", "--format", "onnx",
                        "--out", onnx, timeout=120, cwd=tmp_path, preexec_fn=limited)
    assert export.returncode == 1, export.stderr[-2000:]
    assert one_line_error(export) == (f"error: cannot write {onnx}: it passes this process's "
                                      f"file size limit; {fix}.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["tools/lr_find.py", "tools/compare.py", "tools/bench.py",
                                    "tools/gpu_suite.py"])
def test_commands_run_under_python_OO(script):
    """python -OO strips docstrings: these took their --help description from
    __doc__.splitlines(), and every use of them ended in an AttributeError traceback."""
    result = subprocess.run([sys.executable, "-OO", str(ROOT / script), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ") and result.stderr == ""


@pytest.mark.parametrize("script", ["tools/lr_find.py", "tools/compare.py", "tools/bench.py",
                                    "tools/gpu_suite.py"])
def test_help_describes_a_command_by_its_docstrings_first_line_only(script):
    """--help's description is the docstring's first line (common.cli.summary): the rest of
    it, paragraphs on how figures are made, is for the source's reader."""
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False)
    first, rest = (" ".join(part.split()) for part in doc.split("\n", 1))
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    said = " ".join(result.stdout.split())
    assert first in said and rest[:40] not in said, result.stdout


@pytest.mark.parametrize("name, value, said", [
    ("TORCH_LOGS", "garbage", "error: torch cannot load with TORCH_LOGS='garbage': it is no "),
    ("TORCHINDUCTOR_CACHE_DIR", "afile", "error: TORCHINDUCTOR_CACHE_DIR='afile': ")],
    ids=["TORCH_LOGS", "TORCHINDUCTOR_CACHE_DIR"])
def test_a_torch_setting_refused_in_a_background_job_is_one_line_too(name, value, said,
                                                                     tmp_path):
    """A background job (`train.py &` from a script) starts with SIGINT ignored, and takes
    interruptible_imports' other branch: a setting torch fails on as it loads is one line there
    too, not a traceback (ending in pages of log names, or in 'File exists')."""
    (tmp_path / "afile").write_text("x")
    result = train("--out", tmp_path / "run", timeout=120, cwd=tmp_path,
                   env={**os.environ, name: value},
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_line_error(result).startswith(said)
    assert not (tmp_path / "run").exists()


def test_a_name_stdout_cannot_encode_is_printed_escaped(tmp_path):
    """A path named 'dé' printed on an ASCII stdout (PYTHONIOENCODING=ascii; LC_ALL=C where
    Python has no UTF-8 mode) ended the command in a UnicodeEncodeError traceback, exit 1:
    here prepare's --data-dir, whose .beton files it prints."""
    data = tmp_path / "dé"
    result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--synthetic-size",
                        "64", "32", "--data-dir", data, timeout=120,
                        env={**os.environ, "PYTHONIOENCODING": "ascii"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        f"{tmp_path}/d\\xe9/synthetic-64-32-seed0-{split}.beton" for split in ("train", "test")]


def test_a_name_in_no_utf8_is_printed_as_its_bytes(tmp_path):
    """A --data-dir whose name's bytes are not UTF-8 is printed as those bytes, as ls prints
    it, even where stdout's encoding is strict: not as '\\udcff' escapes."""
    data = tmp_path / os.fsdecode(b"d\xff")
    result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--synthetic-size",
                        "64", "32", "--data-dir", data, timeout=120,
                        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, cwd=tmp_path,
                        errors="surrogateescape")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        f"{data}/synthetic-64-32-seed0-{split}.beton" for split in ("train", "test")]


def test_allocator_settings_torch_reads_pass(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF",
                       "expandable_segments:True,roundup_power2_divisions:[256:1,512:2]")
    assert allocator_problem() is None
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    problem = allocator_problem()  # the setting torch aborts on, not every one that is set
    assert "setting PYTORCH_CUDA_ALLOC_CONF='garbage' (" in problem
    assert "PYTORCH_ALLOC_CONF" not in problem and "report a bug" not in problem


def test_an_allocator_setting_is_not_blamed_where_the_probe_cannot_load_torch(tmp_path,
                                                                              monkeypatch):
    """The probe failing without torch's abort (no torch package to load: the probe fails
    quietly) is no abort to report: nothing is blamed on the setting."""
    (tmp_path / "torch.py").write_text("")  # a module, no package: the probe finds no lib/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage")
    assert allocator_problem() is None


def test_an_allocator_setting_is_not_blamed_where_the_probe_cannot_start(tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A probe that cannot start at all (no interpreter at sys.executable: the OSError of its
    exec) is no abort to report either, not a traceback before the command could say a word."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage")
    assert allocator_problem() is None


def test_a_listing_names_its_first_names_then_how_many_more():
    assert listing(["a", "b", "c"]) == "a, b, c"
    assert listing(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert listing(["a, b", "c"], 1, "; ") == "a, b and 1 more"


def test_an_error_is_one_line_of_at_most_300_characters_of_its_message():
    """A library's message may span lines or pages (a compiler's, a C++ backtrace): in a
    message or a table row it is one line, its white space runs as one space, cut at 300
    characters (or the limit asked for), after the exception's name."""
    assert one_line(ValueError("bad\n  value:\tthere\n")) == "ValueError: bad value: there"
    assert one_line(RuntimeError("x" * 1000)) == f"RuntimeError: {'x' * 300}"
    assert one_line(OSError("abcdef"), 3) == "OSError: abc"
    assert one_line(KeyError()) == "KeyError: "


def test_a_unicode_line_or_paragraph_separator_is_no_plain_line():
    """str.splitlines splits at U+2028 and U+2029 too: a class name holding one broke its
    table row as a line break does."""
    assert plain_line("truck, big")
    for name in ("a\u2028b", "a\u2029b", "a\nb", "a\tb", " "):
        assert not plain_line(name), repr(name)


@pytest.mark.slow
def test_a_run_trained_with_more_workers_than_these_cores_goes_on_with_fewer(finished,
                                                                              tmp_path, capsys):
    """A run of a bigger machine was 'damaged or edited' for resume, report and export: its
    config failed this machine's check of --workers against the cores. Report and export read
    it as it is; --resume asks for --workers this machine has (main() in this process), and
    goes on with them (a real process)."""
    run = copy_run(finished, tmp_path)
    cores = len(os.sched_getaffinity(0))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["config"]["workers"] = cores + 1  # as on a machine with more cores
    torch.save(ckpt, run / "ckpt.pt")
    assert checkpoint.checked_config(run / "ckpt.pt", ckpt, lambda: TrainConfig(
        **ckpt["config"]), fix="").workers == cores + 1  # report's and export's reading of it
    resume = ("--resume", run, "--epochs", "2")
    refused = in_process(capsys, train_main, *resume)
    assert refused.returncode == 1
    assert one_line_error(refused) == (
        f"error: {run} was trained with --workers {cores + 1}: this process may use {cores} "
        f"core{'s' * (cores != 1)}; pass --workers {cores}{' or fewer' * (cores != 1)} "
        "(--resume may change it).")
    resumed = run_script("engine/train.py", *resume, "--workers", cores, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(checkpoint.load(run / "ckpt.pt")["history"]) == 2


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("option, path", [("--out", "a"), ("--data-dir", "a"), ("--out", "a/run")])
def test_a_path_whose_links_loop_is_named_as_such(option, path, tmp_path, capsys):
    """mkdir said only 'File exists' of it: 'cannot be written (File exists)', or 'cannot use'
    it, where nothing by that name could be seen; or of a folder under it. The first row by a
    real process, the others by main() in this one."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    args = [option, tmp_path / path, *(["--out", tmp_path / "run"] if option == "--data-dir"
                                        else [])]
    result = (train(*args, timeout=120) if (option, path) == ("--out", "a") else
              in_process(capsys, train_main, *TINY, *args))
    assert result.returncode == 1, result.stderr[-2000:]  # found as the path is used
    said = one_line_error(result)
    assert f"{tmp_path / 'a'} is a symbolic link that cannot be followed (to b: its links loop " \
        "or lead nowhere); point it at a path that exists, or remove it." in said
    assert said.endswith("or remove it.")  # its own fix, no second one after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_a_new_run_never_writes_over_files_in_its_out(finished, tmp_path, capsys):
    """A run's own folder is for --resume; a folder holding files of the names a run writes
    (the user's config.json and metrics.csv, say) were written over without a word. The first
    by a real process, the second by main() in this one."""
    run = copy_run(finished, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.json", "metrics.csv"):
        (mine / name).write_text("the user's own\n")
    for out, words in ((run, f"{run} already holds a run; continue it with --resume {run} or "
                             "choose another --out."),
                       (mine, f"{mine} holds metrics.csv, config.json, which a run writes over; "
                              "choose another --out, or move them away.")):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = (train("--out", out, timeout=300) if out == run else
                  in_process(capsys, train_main, *TINY, "--out", out))
        assert result.returncode == 1 and one_line_error(result) == f"error: {words}"
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_a_finished_run_on_a_read_only_share_is_finished_too(finished, tmp_path):
    """A requeued job of a finished run exits 0 saying so; on a read-only share it took the
    run folder's lock first and failed: '--out ... cannot be written', an option not given."""
    with tmpfs(tmp_path / "share", "size=64m") as share:
        run = copy_run(finished, share)
        subprocess.run(["mount", "-o", "remount,ro", str(share)], check=True)
        result = train("--resume", run, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{run} is finished (1/1 epochs): nothing to train" in result.stdout


@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_finished_run(finished, tmp_path, capsys):
    """The resume by a real subprocess; its requeue and refusals by main() in this process."""
    run = copy_run(finished, tmp_path)
    (run / f".ckpt.pt.{ended_pid()}.tmp").write_bytes(b"half a checkpoint of a killed save")
    result = train("--resume", run, "--epochs", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_history(run)] == [1, 2]
    assert read_history(run)[0] == read_history(finished)[0]  # the first epoch is kept as it was
    assert checkpoint.load(run / "ckpt.pt")["config"]["epochs"] == 2
    assert not list(run.glob(".*.tmp"))  # the killed save's temporary was swept

    before = (run / "ckpt.pt").read_bytes()
    # a requeued job: nothing left, not an error
    again = in_process(capsys, train_main, "--resume", run)
    assert again.returncode == 0 and f"{run} is finished (2/2 epochs): nothing to train" in \
        again.stdout, again.stderr[-3000:]
    assert "saved" not in again.stdout  # it saved nothing
    assert "of training" not in again.stdout  # nor trained: no time to account for
    fewer = in_process(capsys, train_main, "--resume", run, "--epochs", 1)
    assert fewer.returncode == 1
    assert one_line_error(fewer) == (f"error: --epochs 1 is fewer than the 2 epochs {run} has "
                                     "done; pass --epochs above 2 to extend it.")
    file = in_process(capsys, train_main, "--resume", run / "ckpt.pt")
    assert file.returncode == 1
    assert one_line_error(file) == (f"error: --resume takes the run folder, not a file; use "
                                    f"--resume {run}")
    assert (run / "ckpt.pt").read_bytes() == before


def trained_on_pictures(tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path]:
    """An image folder of cat, dog and frog in tmp_path/pictures, and a one-epoch run on it in
    tmp_path/run, trained by main() in this process: the tests that use it run the resume they
    check by a real subprocess (a process spends seconds importing torch)."""
    pictures, run = tmp_path / "pictures", tmp_path / "run"
    write_tree(pictures, per_class=(16, 4))
    first = in_process(capsys, train_main, "--dataset", "folder", "--data-dir", pictures,
                       "--width", "8", "--batch-size", "16", "--epochs", "1", "--loader",
                       "resident", "--out", run)
    assert first.returncode == 0, first.stderr[-3000:]
    return pictures, run


@pytest.mark.slow
def test_resume_after_the_classes_changed_names_both(tmp_path, capsys):
    """An image folder that gained a class: the checkpoint's head has one output too few."""
    pictures, run = trained_on_pictures(tmp_path, capsys)
    for split in ("train", "test"):
        shutil.copytree(pictures / split / "dog", pictures / split / "emu")
    result = run_script("engine/train.py", "--resume", run, "--epochs", "2", timeout=300)
    assert result.returncode == 1
    message = one_line_error(result)
    assert f"{run / 'ckpt.pt'} was trained on other classes (3: cat, dog, frog) than its " \
           "data" in message and "now holds (4: cat, dog, emu, frog)" in message, message
    assert len(read_history(run)) == 1


@pytest.mark.slow
def test_resume_after_the_image_folder_moved_says_to_pass_data_dir(tmp_path, capsys):
    """It said only that the recorded folder's train/ was missing, not that --resume takes
    --data-dir for the folder's new place. The refusal by main() in this process, the resume
    with --data-dir by a real one."""
    pictures, run = trained_on_pictures(tmp_path, capsys)
    moved = pictures.rename(tmp_path / "moved")
    result = in_process(capsys, train_main, "--resume", run, "--epochs", 2)
    assert result.returncode == 1
    assert one_line_error(result) == (
        f"error: {run / 'ckpt.pt'} was trained on the image folder {pictures}, which does not "
        "exist (moved or deleted?); pass --data-dir DIR, the folder that now holds its train/ "
        "and test/ (--resume may change it).")
    assert len(read_history(run)) == 1
    result = run_script("engine/train.py", "--resume", run, "--epochs", "2", "--data-dir",
                        moved, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_history(run)) == 2


@pytest.mark.slow
def test_resume_of_a_cifar_folder_that_moved_offline_says_to_pass_data_dir(
        tmp_path, capsys, monkeypatch, closed_port):
    """A run on a CIFAR-format folder since moved, resumed offline: the failed download said to
    use --dataset synthetic, which --resume refuses, and not --data-dir, which it takes. A new
    run's error says what it said. The refusals by main() in this process (the download's URL
    a closed port), the resume with --data-dir by a real one."""
    mycifar, run = tmp_path / "mycifar", tmp_path / "run"
    write_cifar10(mycifar, rows=(40,) * 5, n_test=20)
    first = in_process(capsys, train_main, "--dataset", "cifar10", "--data-dir", mycifar,
                       "--width", 4, "--batch-size", 32, "--epochs", 1, "--loader", "resident",
                       "--out", run)
    assert first.returncode == 0, first.stderr[-3000:]
    moved = mycifar.rename(tmp_path / "moved")
    layout = layouts.LAYOUTS["cifar10"]
    archive = Path(layout.url).name
    url = f"http://127.0.0.1:{closed_port}/{archive}"
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setitem(layouts.LAYOUTS, "cifar10", replace(layout, url=url))
    before = tree(run)
    result = in_process(capsys, train_main, "--resume", run, "--epochs", 2)
    assert result.returncode == 1
    assert one_line_error(result) == (
        f"error: Could not download {url}: [Errno 111] Connection refused. To resume {run} "
        "offline, pass --data-dir DIR, the folder that now holds its data (--resume may change "
        f"it), or place {archive} (md5 {layout.md5}) or its extracted folder {layout.folder}/ "
        f"in {mycifar}.")
    assert tree(run) == before and not mycifar.exists()  # the folder made to download into too
    fresh = in_process(capsys, train_main, "--dataset", "cifar10", "--data-dir", mycifar,
                       "--out", tmp_path / "new")
    assert fresh.returncode == 1
    assert one_line_error(fresh).endswith(f" in {mycifar}, or use --dataset synthetic.")
    result = run_script("engine/train.py", "--resume", run, "--epochs", "2", "--data-dir",
                        moved, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_history(run)) == 2
    assert not mycifar.exists() and not (moved / archive).exists()  # nothing downloaded


def test_a_run_of_one_step_an_epoch_says_so_in_the_singular(data_dir, tmp_path, capsys):
    """The run's first line counts its steps in words, as every count: a batch as large as
    the training split is '1 step an epoch', not '1 steps/epoch'. By main() in this process."""
    out = tmp_path / "run"
    result = in_process(capsys, train_main, *TINY, "--batch-size", SPLIT[0], "--data-dir",
                        data_dir, "--epochs", 1, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f", 1 step an epoch; writing {out}/" in result.stdout, result.stdout


@pytest.mark.slow
def test_resume_refuses_options_it_cannot_apply_by_name(finished, tmp_path, capsys):
    """By main() in this process (test_resume_after_the_classes_changed_names_both's refusal
    is a real subprocess's)."""
    run = copy_run(finished, tmp_path)
    before = (run / "ckpt.pt").read_bytes()
    result = in_process(capsys, train_main, *TINY, "--resume", run, "--lr", "0.5", "--width",
                        "32")
    assert result.returncode == 1
    message = one_line_error(result)
    assert message.startswith(f"error: {run / 'ckpt.pt'}: --lr, --width cannot change when "
                              f"resuming {run}, "), message
    assert "--epochs" in message
    assert (run / "ckpt.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_from_another_directory_uses_the_recorded_data(tmp_path, capsys, monkeypatch):
    """The first run, its --data-dir and --out relative to its folder, by main() in this
    process from there; the resume from another folder by a real subprocess."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    with monkeypatch.context() as inside:
        inside.chdir(first)
        result = in_process(capsys, train_main, *TINY, "--data-dir", "data", "--epochs", 1,
                            "--out", "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (first / "data").is_dir() and (first / "run" / "ckpt.pt").is_file()
    result = train("--resume", first / "run", "--epochs", "2", cwd=second)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (second / "data").exists()  # nothing regenerated relative to the new cwd
    assert len(read_history(first / "run")) == 2


@pytest.mark.slow
def test_resume_refuses_a_ckpt_pt_that_best_pt_is_not_from(finished, data_dir, tmp_path,
                                                           capsys):
    """Another run's ckpt.pt copied into a run folder, or an older one of the same run copied
    back: best.pt held other weights than the run went on from, and a finished run claimed them
    (its early return too). Refused, finished or extended, writing nothing; a damaged best.pt
    too; without best.pt the run resumes. By main() in this process, the runs too."""
    run = copy_run(finished, tmp_path)  # one epoch
    older = (run / "ckpt.pt").read_bytes()
    extended = in_process(capsys, train_main, "--resume", run, "--epochs", 3)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert len(checkpoint.load(run / "best.pt")["history"]) > 1  # an epoch the older lacks
    other = tmp_path / "other"
    made = in_process(capsys, train_main, *TINY, "--width", 4, "--seed", 2, "--data-dir",
                      data_dir, "--epochs", 2, "--out", other)
    assert made.returncode == 0, made.stderr[-3000:]
    best, ckpt_path = run / "best.pt", run / "ckpt.pt"
    mismatch = (f"error: {best} is not from the run {ckpt_path} holds (their histories differ: "
                "another run's ckpt.pt, or an older one of this run, copied over it? or the run "
                f"killed between saving the two?). Put back the ckpt.pt of {best}'s run, or move "
                f"{best} away (or delete it) to resume without it.")
    for ckpt_bytes in ((other / "ckpt.pt").read_bytes(), older):
        ckpt_path.write_bytes(ckpt_bytes)
        before = tree(run)
        for more in ([], ["--epochs", 4]):  # finished as it is, and extended
            result = in_process(capsys, train_main, "--resume", run, *more)
            assert result.returncode == 1, result.stdout[-3000:]
            assert one_line_error(result) == mismatch
            assert tree(run) == before
    content = best.read_bytes()
    best.write_bytes(content[:len(content) // 2])  # cut short
    result = in_process(capsys, train_main, "--resume", run, "--epochs", 2)
    assert result.returncode == 1
    message = one_line_error(result)
    assert message.startswith(f"error: {best} is not a readable checkpoint (")
    assert message.endswith(f" To resume {run}, move {best} away or delete it.")
    best.unlink()
    result = in_process(capsys, train_main, "--resume", run, "--epochs", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_history(run)) == 2


# --- divergence -------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_in_the_first_epoch_says_nothing_was_saved(data_dir, tmp_path):
    out = tmp_path / "out"
    result = train("--data-dir", data_dir, "--epochs", "1", "--optimizer", "sgd", "--lr", "1e12",
                   "--schedule", "constant", "--out", out)
    assert result.returncode == 1
    message = one_line_error(result)
    assert "NaN or infinite in epoch 1, batch" in message
    assert "nothing was saved" in message and message.endswith("a lower --lr (e.g. --lr 1e+11).")
    assert not (out / "ckpt.pt").exists()  # so the same --out takes the next try


@pytest.mark.slow
def test_divergence_from_a_huge_weight_decay_names_the_weight_decay(data_dir, tmp_path,
                                                                   capsys):
    """It advised a lower --lr, which left the cause in place. By main() in this process (the
    divergence above is a real subprocess's)."""
    result = in_process(capsys, train_main, *TINY, "--data-dir", data_dir, "--epochs", 1,
                        "--weight-decay", "1e11", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert one_line_error(result).endswith(
        "start again with a --weight-decay far below 1 (the default is 0.0005; it diverged with "
        "1e+11).")


@pytest.mark.parametrize("options, done, advice", [
    (dict(weight_decay=1.0), 0, "a --weight-decay far below 1 (the default is 0.0005; it "
                                "diverged with 1)."),
    (dict(weight_decay=0.99, lr=0.4), 0, "a lower --lr (e.g. --lr 0.04)."),
    (dict(lr=0.4), 3, "a lower --lr (e.g. --lr 0.04) and a new --out."),
    (dict(precision="fp16", weight_decay=5.0), 3, "--precision bf16 (or fp32) instead of fp16 "
                                                  "and a new --out."),
], ids=["weight decay of 1", "weight decay below 1", "after a saved epoch", "fp16"])
def test_a_divergence_names_the_option_to_change_and_a_new_out_once_an_epoch_is_saved(
        options, done, advice):
    """A weight decay of 1 scales the weights by 1 - lr each step: its own cause, not the LR.
    fp16's overflow comes first of all. Once ckpt.pt holds an epoch, the same --out is taken,
    so a new run needs another."""
    cfg = TrainConfig(out="runs/x", **options)
    message = str(loop.diverged(SimpleNamespace(cfg=cfg), done, "it diverged"))
    assert message.endswith(f". --resume would repeat it: start again with {advice}"), message
    kept = "runs/x/ckpt.pt keeps epoch 3" if done else "no epoch had finished"
    assert message.startswith(f"it diverged; {kept}"), message


def test_a_divergence_names_the_first_batch_whose_loss_overflowed(data_dir, tmp_path,
                                                                  monkeypatch):
    """Counted from 1, as the progress bar counts: the batch whose loss was the first to be NaN
    or infinite, as the steps themselves return it."""
    losses = []

    def step(run, images, labels):
        loss, correct = train_step(run, images, labels)
        losses.append(loss.item())
        return loss, correct

    monkeypatch.setattr(loop, "train_step", step)
    cfg = tiny_config(data_dir, tmp_path / "out", batch_size=64, optimizer="sgd", lr=1e12,
                      schedule="constant")
    message = diverged(cfg)
    first = next(i for i, loss in enumerate(losses) if not math.isfinite(loss))
    assert first > 0  # the first step's loss is of the initial weights
    assert message.startswith(
        f"the training loss became NaN or infinite in epoch 1, batch {first + 1}; no epoch"), (
        message)


def test_a_divergence_in_an_epochs_first_batch_is_found_and_named_batch_1(data_dir, tmp_path,
                                                                        monkeypatch):
    """The first batch is index 0: a loss that is infinite there stops the run as one later
    would, named as batch 1 (not taken for no batch at all, which trained on and saved the
    epoch, nor for a batch of another process)."""
    steps = []

    def step(run, images, labels):
        loss, correct = train_step(run, images, labels)
        steps.append(1)
        return (torch.full_like(loss, float("inf")) if len(steps) == 1 else loss), correct

    monkeypatch.setattr(loop, "train_step", step)
    message = diverged(tiny_config(data_dir, tmp_path / "out"))
    assert message.startswith(
        "the training loss became NaN or infinite in epoch 1, batch 1; no epoch had finished, "
        "so nothing was saved."), message


def test_a_run_that_saved_nothing_keeps_a_trackers_folder_it_did_not_make(data_dir, tmp_path):
    """A run that ends before its first epoch takes its trackers' folder with it, but only one
    it made: a folder of that name already in --out (the user's own) is left as it was."""
    out = tmp_path / "out"
    (out / "cifar10-engine").mkdir(parents=True)
    (out / "cifar10-engine" / "notes.txt").write_text("mine")
    cfg = tiny_config(data_dir, out, optimizer="sgd", lr=1e12, schedule="constant",
                      log_with="tensorboard")
    assert "nothing was saved" in diverged(cfg)
    assert (out / "cifar10-engine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("saved", [False, True])
def test_files_of_no_saved_epoch_go_on_the_way_out_and_only_those(tmp_path, saved):
    """unsaved_removed, as train leaves by an error: a best.pt without its ckpt.pt goes, and the
    trackers' folder the run made with it; once ckpt.pt is there, all of them stay."""
    (tmp_path / "best.pt").write_bytes(b"best")
    logs = tmp_path / "cifar10-engine"
    (logs / "run").mkdir(parents=True)
    if saved:
        (tmp_path / "ckpt.pt").write_bytes(b"ckpt")
    with pytest.raises(RuntimeError, match="stopped"), loop.unsaved_removed(tmp_path, logs):
        raise RuntimeError("stopped")
    assert (tmp_path / "best.pt").exists() == logs.exists() == saved


def test_a_ctrl_c_a_library_turned_into_its_own_error_still_says_what_was_kept(
        data_dir, tmp_path, monkeypatch, capsys):
    """A library may catch the KeyboardInterrupt of a Ctrl-C and raise an error of its own:
    the run still stops as a stop, saying what was kept (the command said a bare
    'interrupted', as for a stop before the run began)."""
    def converts(run, history, log) -> float:  # as such a library, where the epochs begin
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("a library's own error") from None
        return 0.0

    monkeypatch.setattr(loop, "fit", converts)
    cfg = tiny_config(data_dir, tmp_path / "out")
    assert run_main(lambda: train_run(cfg)) == 130
    assert capsys.readouterr().err == ("\ninterrupted: no epoch had finished, so nothing was "
                                       "saved; run the same command again\n")


def test_a_run_called_as_a_library_closes_its_trackers(data_dir, tmp_path):
    """train() in a process that goes on (tools/compare.py trains several runs in one) closes
    its --log-with writers: their threads end once it returns, each run's events written."""
    before = set(threading.enumerate())
    out = tmp_path / "out"
    cfg = tiny_config(data_dir, out, log_with="tensorboard")
    train_run(cfg, end_process_group=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the epoch's scalars in the file once it returns, not only the file the writer made
    events = EventAccumulator(str(next((out / "cifar10-engine").rglob(
        "events.out.tfevents.*")).parent)).Reload()
    assert "test_acc" in events.Tags()["scalars"]
    assert set(threading.enumerate()) <= before


def test_nonfinite_weights_and_buffers_are_found_by_name():
    model = build_model("resnet18", 10, 4)
    assert checkpoint.nonfinite(model.state_dict()) == []
    with torch.no_grad():
        model.layer2[0].bn1.running_var[3] = float("nan")
        model.fc.weight[0, 0] = float("inf")
    assert checkpoint.nonfinite(model.state_dict()) == ["layer2.0.bn1.running_var", "fc.weight"]


def test_an_epoch_whose_test_loss_or_weights_are_not_finite_is_not_kept():
    """Each check on its own: a weight can overflow in the epoch's last step, after its loss
    was taken; a test loss can overflow with every weight finite."""
    model = build_model("resnet18", 10, 4)
    run = SimpleNamespace(cfg=TrainConfig(out="runs/x"), unwrapped=model)
    loop.check_finite(run, 1, dict(test_loss=2.3))  # finite: nothing to say
    with pytest.raises(RunFailed) as refused:
        loop.check_finite(run, 1, dict(test_loss=float("inf")))
    assert str(refused.value).startswith("the test loss became NaN or infinite in epoch 2; "
                                         "runs/x/ckpt.pt keeps epoch 1,"), refused.value
    with torch.no_grad():
        model.layer1[0].bn2.running_mean[0] = float("nan")
    with pytest.raises(RunFailed) as refused:
        loop.check_finite(run, 1, dict(test_loss=2.3))
    assert str(refused.value).startswith(
        "1 weights or BatchNorm statistics became NaN or infinite in epoch 2 "
        "(layer1.0.bn2.running_mean); runs/x/ckpt.pt keeps epoch 1,"), refused.value


def test_an_epoch_whose_test_loss_overflowed_is_not_saved(data_dir, tmp_path, monkeypatch):
    """Every training loss finite, every weight too, but the test loss infinite (a logit that
    overflowed in evaluation): the epoch is refused as a divergence, and nothing is saved."""
    from engine.evaluate import evaluate

    def overflowed(*args):
        totals = evaluate(*args)
        totals[0] = float("inf")
        return totals

    monkeypatch.setattr(loop, "evaluate", overflowed)
    message = diverged(tiny_config(data_dir, tmp_path / "out"))
    assert message.startswith(
        "the test loss became NaN or infinite in epoch 1; no epoch had finished"), message


# --- out of memory --------------------------------------------------------------------------------


def test_running_out_of_memory_on_the_cpu_names_the_batch_size_to_try(data_dir, tmp_path):
    """The CPU allocator's failure is a RuntimeError, not CUDA's OutOfMemoryError: it gets the
    same one-line message. A 7 GiB address-space limit stands in for a small machine."""
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (7 << 30, 7 << 30))

    out = tmp_path / "out"
    # width 256: ~2 GB of weights, gradients and momentum fit; 1 GB per activation does not.
    # The run computes the forward's convolutions until an activation fails to fit: each GiB
    # of limit above what the model needs is seconds of them (8 GiB took ~5 s longer than 7);
    # 4 GiB is too little for the model itself (the message names --width, not the batch)
    result = train("--data-dir", data_dir, "--width", "256", "--batch-size", "1024",
                   "--epochs", "1", "--out", out, timeout=300, preexec_fn=limit_memory)
    assert result.returncode == 1
    assert one_line_error(result) == ("error: out of memory at --batch-size 1024; try "
                                      "--batch-size 512.")
    assert not out.exists()


def test_out_of_memory_beyond_the_split_suggests_half_the_split(data_dir, tmp_path,
                                                                monkeypatch):
    """A --batch-size over the 1024-image split ran as batches of 1024: halving the option
    (to 5e14) would run the same batch again, so the advice halves the batch that ran."""
    def full(*args) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(loop, "train_step", full)
    cfg = tiny_config(data_dir, tmp_path / "out", batch_size=10**15)
    with pytest.raises(TrainingError) as refused:
        train_run(cfg)
    assert str(refused.value) == ("out of memory at --batch-size 1000000000000000 (batches of "
                                  "1024, the whole split); try --batch-size 512.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("processes, ran", [(1, "the whole split"), (2, "this process's shard")])
def test_out_of_memory_beyond_a_shard_names_the_shard_a_process_ran(processes, ran):
    """Each of several processes trains on its shard: a --batch-size above it ran as batches of
    the shard, and the message says so, not that they were the whole split."""
    run = SimpleNamespace(train_loader=SimpleNamespace(batch_size=500))
    message = str(loop.out_of_memory_failure(TrainConfig(batch_size=1024), run, processes))
    assert message == (f"out of memory at --batch-size 1024 (batches of 500, {ran}); try "
                       "--batch-size 250.")


@pytest.mark.parametrize("batch, advice", [(1, "a --width below 8"), (2, "--batch-size 1")])
def test_out_of_memory_at_a_batch_of_one_suggests_a_narrower_model(data_dir, tmp_path,
                                                                   monkeypatch, batch, advice):
    """Halving a batch of one is no advice: the model is what does not fit. A batch of two
    still halves."""
    def full(*args) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(loop, "train_step", full)
    cfg = tiny_config(data_dir, tmp_path / "out", batch_size=batch)
    with pytest.raises(TrainingError) as refused:
        train_run(cfg)
    assert str(refused.value) == f"out of memory at --batch-size {batch}; try {advice}."


def test_each_epoch_trains_on_an_order_of_its_own(data_dir, tmp_path, monkeypatch):
    """The loader is set to each epoch's number: set to one for all, every epoch would train
    on the same batches in the same order, augmented alike."""
    labels_seen = []

    def step(run, images, labels):
        labels_seen.append(labels.clone())
        return train_step(run, images, labels)

    monkeypatch.setattr(loop, "train_step", step)
    cfg = tiny_config(data_dir, tmp_path / "out", epochs=2)
    train_run(cfg)
    first, second = torch.cat(labels_seen[:4]), torch.cat(labels_seen[4:])
    assert len(labels_seen) == 8 and len(first) == len(second) == 1024
    assert torch.equal(first.sort().values, second.sort().values)  # the whole split, each
    assert not torch.equal(first, second)


def test_a_stop_signal_lost_while_the_run_is_built_stops_it_before_its_first_step(
        data_dir, tmp_path, monkeypatch, capsys):
    """A SIGTERM raised inside a __del__ (numba's, while FFCV compiles a loader) is dropped by
    Python: the run stops once built, not after its first step, which may compile the model
    for a minute before the first progress update raises it again."""
    def loader_then_lost_signal(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        SignalsWhenCollected()
        return loader

    steps = []
    monkeypatch.setattr("engine.run.make_loader", loader_then_lost_signal)
    monkeypatch.setattr(loop, "train_step", lambda *args: steps.append(1) or train_step(*args))
    cfg = tiny_config(data_dir, tmp_path / "out")
    assert run_main(lambda: train_run(cfg)) == 143 and steps == []
    assert capsys.readouterr().err.endswith(
        "interrupted: no epoch had finished, so nothing was saved; run the same command again\n")


def test_ctrl_c_as_the_run_folder_is_taken_says_what_was_kept_and_leaves_no_folder(
        data_dir, tmp_path, monkeypatch, capsys):
    """A Ctrl-C landing between the run folder's lock and the build (here: as a killed save's
    temporaries are swept) says what was kept, as one in the build or an epoch does; it was a
    bare 'interrupted', and tools/compare.py could not name the run it stopped."""
    monkeypatch.setattr(loop, "sweep_temporaries", lambda out: os.kill(os.getpid(),
                                                                         signal.SIGINT))
    cfg = tiny_config(data_dir, tmp_path / "out")
    assert run_main(lambda: train_run(cfg)) == 130
    assert capsys.readouterr().err.endswith(
        "interrupted: no epoch had finished, so nothing was saved; run the same command again\n")
    assert not (tmp_path / "out").exists()


def test_a_model_too_wide_for_memory_names_the_width_not_the_batch(data_dir, tmp_path):
    """Width 100,000 asks for terabytes of weights: halving the batch would not help."""
    out = tmp_path / "out"
    result = train("--data-dir", data_dir, "--width", "100000", "--out", out, timeout=300)
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: out of memory building the run (the model at --width 100000 and the split "
        "--loader resident holds on the device); try a smaller --width or --loader ffcv.")
    assert not out.exists()


def test_cuda_libraries_failing_to_allocate_count_as_out_of_memory():
    """cuBLAS and cuDNN report a full GPU in their own words, not as OutOfMemoryError."""
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                          "`cublasCreate(handle)`")
    assert out_of_memory(cublas) and out_of_memory(RuntimeError("cuDNN error: "
                                                                "CUDNN_STATUS_ALLOC_FAILED"))
    for where in ("HOST", "DEVICE"):  # cuDNN 9's words for it
        assert out_of_memory(RuntimeError(
            f"cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_{where}_ALLOCATION_FAILED"))
    try:  # as torch.compile's backend wraps it
        raise RuntimeError("backend compiler failed") from cublas
    except RuntimeError as wrapped:
        assert out_of_memory(wrapped)
    assert not out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    # no allocation failed in this process (no GPU here): a convolution no cuDNN engine runs
    assert not out_of_memory(RuntimeError("FIND was unable to find an engine to execute this "
                                          "computation"))


def test_an_engine_error_raised_while_handling_an_allocation_failure_passes_as_it_is():
    """Its own words say more than the generic advice it would be replaced with."""
    with pytest.raises(EngineError, match="^the specific one$"), \
            out_of_memory_as(EngineError("the generic advice")):
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError:
            raise EngineError("the specific one") from None
    with pytest.raises(EngineError, match="^the generic advice$"), \
            out_of_memory_as(EngineError("the generic advice")):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_memory_error_and_an_error_raised_while_handling_a_failed_allocation_are_refused():
    """The one-line advice, not a traceback, for a MemoryError (numpy's, Python's: a picture
    or a batch of maps too large) and for an error raised while handling a real failed
    allocation (its cleanup failing too: the allocation is what the user has to lower)."""
    refusal = EngineError("the generic advice")
    with pytest.raises(EngineError) as refused, out_of_memory_as(refusal):
        bytearray(1 << 62)
    assert refused.value is refusal
    with pytest.raises(EngineError) as refused, out_of_memory_as(refusal):
        try:
            cpu_out_of_memory()
        except RuntimeError:
            raise ValueError("cleaning up failed too")  # noqa: B904 (its context is the point)
    assert refused.value is refusal


def test_a_collective_failing_over_gloo_or_torchs_dist_error_is_a_peer_gone():
    """Several processes: the one whose barrier failed says only that another stopped."""
    assert peer_gone(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                  "Connection closed by peer [127.0.0.1]:29500"))
    assert peer_gone(torch.distributed.DistError("NCCL communicator was aborted"))
    assert not peer_gone(RuntimeError("CUDA error: device-side assert triggered"))
    assert not peer_gone(ValueError("gloo"))


@pytest.mark.slow
def test_a_torchvision_worker_killed_mid_training_is_one_clear_error(data_dir, tmp_path):
    """The OOM killer ends a DataLoader worker: torch says so in next(), or wherever the main
    thread is when its SIGCHLD handler runs (mid-step, say); either way one line with the fix."""
    proc = start("--data-dir", str(data_dir), "--epochs", "3", "--loader", "torchvision",
                 "--workers", "1", "--out", str(tmp_path / "out"))
    try:
        workers = wait_until(lambda: data_workers(proc.pid), 300, "no worker started",
                             process=proc, interval=0.05)
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: a --loader torchvision worker reading " in stderr
    assert "pass fewer --workers (here 1), or use --loader ffcv." in stderr


def test_a_worker_death_raised_mid_step_is_the_same_one_clear_error(data_dir, tmp_path,
                                                                    monkeypatch):
    """torch's SIGCHLD handler raises a dead worker's error wherever the main thread is: in a
    training step, outside the loader's own next(), the run still says which loader's worker
    died and the fix, not torch's words alone."""
    def killed(*args) -> None:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(loop, "train_step", killed)
    cfg = tiny_config(data_dir, tmp_path / "out", loader="torchvision")
    with pytest.raises(EngineError) as refused:
        train_run(cfg)
    message = str(refused.value)
    assert message.startswith("a --loader torchvision worker reading ") and message.endswith(
        "died (RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed.); most "
        "often the system ran out of memory: pass fewer --workers (here 1), or use --loader "
        "ffcv."), message
    assert not (tmp_path / "out").exists()


# --- a full disk --------------------------------------------------------------------------------


def limit_file_size(limit: int):
    """preexec_fn: files past `limit` bytes fail with EFBIG, as writes to a full disk fail."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_a_full_disk_while_saving_the_checkpoint_is_a_clear_error(data_dir, tmp_path, epochs):
    """The write runs beside the next epoch, so its error comes at that epoch's next step (or,
    after the last epoch, at once): the same message either way, and nothing half-written."""
    out = tmp_path / "out"
    # width 16: best.pt holds the weights (~2.8 MB), ckpt.pt adds the optimizer (~5.6 MB)
    result = train("--data-dir", data_dir, "--width", "16", "--epochs", epochs, "--out", out,
                   timeout=300, preexec_fn=limit_file_size(4 * 2**20))
    assert result.returncode == 1
    message = one_line_error(result)
    assert f"could not write {out / 'ckpt.pt'}" in message and "free" in message
    # torch's writer names no errno: a full disk or the file size limit (set here), whose fix
    # is space or a higher limit, not permissions
    assert ("; nothing was written. Raise this process's file size limit (`ulimit -f "
            "unlimited`) or free some space (or choose another --out) and run the same command "
            "again. Its disk has ") in message
    # no temporary, nor the best.pt written before ckpt.pt failed, nor the folder made for them
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_a_failed_save_stops_the_next_epoch_at_its_next_step(data_dir, tmp_path, monkeypatch):
    """Epoch 1's files are written while epoch 2 trains; their write failed, and epoch 2 went
    on to its end (a long one, on a CPU) before the error was raised. Now the next step raises
    it: epoch 2's steps are lost either way. 1024 images in batches of 64: 16 steps an epoch;
    the write fails once epoch 2's first step has begun, which then waits for it."""
    began, failed, steps = threading.Event(), threading.Event(), []
    step = loop.train_step

    def full_disk(out: Path, *_) -> None:
        began.wait(timeout=60)
        failed.set()
        raise CheckpointError(f"could not write {out / 'ckpt.pt'} (No space left on device)")

    def counted(*args):
        steps.append(len(steps) + 1)
        if len(steps) == 17:
            began.set()
            assert failed.wait(timeout=60)
        return step(*args)

    monkeypatch.setattr(checkpoint, "write_epoch", full_disk)
    monkeypatch.setattr(loop, "train_step", counted)
    with pytest.raises(CheckpointError, match="could not write .*No space left on device"):
        train_run(tiny_config(data_dir, tmp_path / "out", epochs=2, batch_size=64))
    assert len(steps) == 17


def test_an_out_without_space_for_the_checkpoints_is_refused_before_the_first_epoch(
        data_dir, tmp_path):
    """A disk with a few KiB free took the run: a whole epoch trained (long, on a CPU)
    before the first save failed. Width 16's weights take 2.7 MiB, in best.pt and again in
    ckpt.pt beside nesterov's momentum (2.7 MiB more), for each of two epochs while one
    replaces the other; this disk has 1 MiB."""
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        result = train("--width", "16", "--data-dir", data_dir, "--out", disk / "run",
                       timeout=300)
        left = list(disk.iterdir())
    assert result.returncode == 1, result.stderr[-2000:]
    said = one_line_error(result)
    assert said.startswith(f"error: --out {disk / 'run'}: its disk has ") and said.endswith(
        " MiB free, and this run's checkpoints (width 16, nesterov) need at least 16.1 MiB "
        "(best.pt and ckpt.pt, two epochs of them while one replaces the other); free some "
        "space or choose another --out."), said
    assert left == [] and "train loss" not in result.stdout  # no epoch line


@pytest.mark.parametrize("epochs, resumed, refused", [(2, False, True), (1, False, False),
                                                     (2, True, False)])
def test_the_space_checked_is_one_epochs_files_or_two_while_one_replaces_the_other(
        tmp_path, epochs, resumed, refused):
    """Width 16 with nesterov: best.pt's weights (2.7 MiB), ckpt.pt's and its momentum
    (5.4 MiB): 8 MiB an epoch, on a 12 MiB disk. A new run of two epochs writes the second's
    beside the first's and is refused; one epoch, or a resumed run (its files already there),
    needs room for one epoch's files."""
    cfg = TrainConfig(width=16, optimizer="nesterov", momentum=0.9, epochs=epochs)
    with tmpfs(tmp_path / "disk", "size=12m") as disk:
        if refused:
            with pytest.raises(CheckpointError, match=r"need at least 16\.1 MiB \(best\.pt and "
                               r"ckpt\.pt, two epochs of them while one replaces the other\)"):
                checkpoint.check_space(disk, build_model("resnet18", 10, 16), cfg, resumed)
        else:
            checkpoint.check_space(disk, build_model("resnet18", 10, 16), cfg, resumed)


@pytest.mark.slow
def test_a_resumed_run_goes_on_on_a_disk_with_room_for_one_epochs_files(finished, tmp_path):
    """--resume on a disk whose free space (half again the run's files) holds one epoch's files
    beside the last ones, not two epochs' as a new run's check asks: it trains on, and saves."""
    files = sum(p.stat().st_size for p in finished.iterdir())
    with tmpfs(tmp_path / "disk", f"size={files * 5 // 2}") as disk:
        run = copy_run(finished, disk)
        trained = train_run(TrainConfig(), run, {"epochs": 2})
        assert trained.epochs_run == 1 and len(read_history(run)) == 2


@pytest.mark.slow
def test_stdout_on_a_full_disk_mid_run_is_named_and_the_epochs_kept(data_dir, tmp_path):
    """stdout in a file on a disk that fills after a few lines (a one-page tmpfs, the file
    padded to leave 300 bytes: the run's first line and at most two epochs' lines; a short
    write leaves the rest in the buffer, so the next line fails): print's error named no file
    ('the disk is full; ...'). It names standard output, and the epochs done are saved."""
    out = tmp_path / "out"
    with tmpfs(tmp_path / "disk", "size=4k") as disk:
        log = disk / "train.log"
        log.write_bytes(b"\n" * (4096 - 300))
        with open(log, "a") as stdout:
            result = subprocess.run(
                [sys.executable, str(ROOT / "engine" / "train.py"), *TINY, "--data-dir",
                 data_dir, "--epochs", "4", "--out", out], cwd=ROOT, stdout=stdout,
                stderr=subprocess.PIPE, text=True, timeout=300)
        written = log.read_text().split()
    assert result.returncode == 1 and written[0] == "synthetic", written
    assert one_line_error(result) == ("error: the disk is full writing standard output; free "
                                      "some space or write to another disk.")
    assert 1 <= len(read_history(out)) < 4 and (out / "ckpt.pt").exists()


@pytest.mark.slow
def test_a_run_saved_before_a_history_column_came_resumes(finished, tmp_path, capsys):
    """By main() in this process (test_resume_with_more_epochs_extends_a_finished_run resumes
    by a real subprocess)."""
    run = copy_run(finished, tmp_path)
    for name in ("ckpt.pt", "best.pt"):  # an older run wrote both so: best.pt begins its run
        _damaged(run, lambda ckpt: [row.pop(key) for row in ckpt["history"]
                                    for key in ("eval_seconds", "train_images", "test_images")],
                 name)
    result = in_process(capsys, train_main, *TINY, "--resume", run, "--epochs", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    header, first, second = (run / "metrics.csv").read_text().splitlines()
    assert "eval_seconds" in header.split(",") and len(read_history(run)) == 2


def test_a_best_pt_renamed_into_place_without_its_ckpt_pt_is_removed(data_dir, tmp_path,
                                                                     monkeypatch):
    """The first epoch's files are renamed into place one by one, best.pt first: a rename of
    ckpt.pt that fails (the disk failed) left a best.pt of a run that saved nothing, and a
    --out the next run refuses as one that holds a run's files."""
    real = os.replace

    def failing_for_ckpt_pt(source, target) -> None:
        if Path(target).name == "ckpt.pt":
            raise OSError(errno.EIO, "Input/output error", str(source))
        real(source, target)

    monkeypatch.setattr("common.atomic.os.replace", failing_for_ckpt_pt)
    out = tmp_path / "out"
    cfg = tiny_config(data_dir, out)
    with pytest.raises(EngineError, match=f"could not write {out / 'ckpt.pt'}"):
        train_run(cfg)
    assert not (out / "best.pt").exists() and not out.exists()  # nor the folder made for it


@pytest.mark.parametrize("slow", ["content", "write_epoch"])
def test_the_time_waited_for_checkpoints_counts_the_copy_and_the_last_write(
        data_dir, tmp_path, monkeypatch, slow):
    """What training waited for: the state's copy, taken before the epoch's files go to the
    writer thread, and at the end the last epoch's write, still going. Either one slowed by
    half a second is in the seconds the command says it waited for checkpoints."""
    real = getattr(checkpoint, slow)

    def slowed(*args):
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(checkpoint, slow, slowed)
    cfg = tiny_config(data_dir, tmp_path / "out")
    trained = train_run(cfg)
    assert trained.epochs_run == 1 and trained.checkpoint_wait_s >= 0.5, trained


# --- one core ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_one_core_ends_instead_of_hanging_at_exit(data_dir, tmp_path):
    """On a machine (or container, or taskset) with one core, numba's TBB threads, started by
    FFCV's import, used to hang the process at exit once training was done (numba#10556);
    loaders.guards.importing_ffcv picks another threading layer there."""
    core = {min(os.sched_getaffinity(0))}
    # --loader ffcv: the other loaders read their .beton without importing FFCV
    result = train("--data-dir", data_dir, "--epochs", "1", "--loader", "ffcv", "--out",
                   tmp_path / "out", timeout=600,  # a hang fails here; a loaded host is slow
                   preexec_fn=lambda: os.sched_setaffinity(0, core))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "ckpt.pt").is_file()


# --- Ctrl-C -------------------------------------------------------------------------------------


# engine/train.py with a Ctrl-C sent to itself at the range test's third step
CTRL_C_IN_THE_RANGE_TEST = """
import os, signal, sys
import engine.lr_range
from engine import train
real, steps = engine.lr_range.train_step, []
def step(*args):
    steps.append(args)
    if len(steps) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args)
engine.lr_range.train_step = step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_during_lr_auto_does_not_advise_resuming(data_dir, tmp_path):
    """The Ctrl-C lands inside the range test, not at a time guessed to fall in it: the stop
    is said as one before any epoch, with no --resume (no ckpt.pt holds the found LR)."""
    out = tmp_path / "out"
    result = run_code(CTRL_C_IN_THE_RANGE_TEST, *TINY, "--data-dir", data_dir, "--lr", "auto",
                      "--out", out, timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "--resume" not in result.stderr
    assert "nothing was saved" in result.stderr
    assert "LR range test:" not in result.stdout  # stopped before the range test ended
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux's setsid")
def test_a_closed_terminal_stops_training_as_cleanly_as_ctrl_c(data_dir, tmp_path):
    """An SSH session dropped: its terminal hangs up, the kernel sends the run SIGHUP, and the
    run's writes to the terminal fail (EIO). SIGHUP killed the run on the spot, whatever it
    was writing; now it stops as Ctrl-C does: exit 129, every finished epoch kept, no lock or
    temporary left."""
    out = tmp_path / "out"
    terminal, run_side = pty.openpty()
    # setsid --ctty: the run leads a session whose controlling terminal is the pty, as a login
    # shell's command is
    proc = subprocess.Popen(["setsid", "--ctty", "--wait", sys.executable,
                             str(ROOT / "engine" / "train.py"), *TINY, "--data-dir",
                             str(data_dir), "--epochs", "30", "--out", str(out)],
                            cwd=ROOT, stdin=run_side, stdout=run_side, stderr=run_side)
    os.close(run_side)
    said = bytearray()
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists():  # the terminal read meanwhile, as a user's is
        assert time.monotonic() < deadline and proc.poll() is None, said.decode()[-3000:]
        if select.select([terminal], [], [], 0.05)[0]:
            with suppress(OSError):
                said += os.read(terminal, 65536)
    os.close(terminal)  # the hang-up
    assert proc.wait(timeout=120) == 129, said.decode()[-3000:]
    done = len(read_history(out))
    assert 0 < done < 30 and checkpoint.load(out / "ckpt.pt")["epoch"] == done
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# prints to its terminal until a write fails; its body's line if one does
PRINTS_TO_A_TERMINAL = """
import sys, time
from common.cli import run_main
def body():
    while True:
        print("epoch", flush=True)
        time.sleep(0.01)
sys.exit(run_main(body))
"""


def test_a_terminal_hung_up_before_its_sighup_came_is_a_stop_as_by_sighup():
    """The kernel fails a hung-up terminal's writes (EIO) first and sends SIGHUP after: a
    write in between ended the run with 'error: ... Input/output error' and 1, where the
    signal gives 129 (the whole suite, on a loaded machine, once failed the test above so).
    A pty that is not the command's controlling terminal hangs up with no SIGHUP at all."""
    terminal, run_side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", PRINTS_TO_A_TERMINAL], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=run_side, stderr=run_side,
                            start_new_session=True)  # a session of its own: no SIGHUP for it
    os.close(run_side)
    said = bytearray()
    deadline = time.monotonic() + 120
    while b"epoch" not in said:
        assert time.monotonic() < deadline and proc.poll() is None, said.decode()
        if select.select([terminal], [], [], 0.05)[0]:
            said += os.read(terminal, 65536)
    os.close(terminal)  # the hang-up
    assert proc.wait(timeout=60) == 129


# its body fails with EIO; the terminal's SIGHUP comes as run_main looks at its streams
SIGHUP_AS_IT_LOOKS = """
import errno, os, signal, sys
import common.streams
from common.cli import run_main
sent = []
def sighup_now(stream):  # once, as the terminal's shell hands it on
    if not sent:
        sent.append(stream)
        os.kill(os.getpid(), signal.SIGHUP)
    return True
common.streams._hung_up_terminal = lambda stream: True
common.streams.quiet_if_gone = sighup_now
def body():
    raise OSError(errno.EIO, "Input/output error")
sys.exit(run_main(body))
"""


def test_the_sighup_of_a_terminal_that_hung_up_as_run_main_looks_is_the_same_stop():
    """The SIGHUP follows the failed write at once: as run_main looked at the streams it
    raised out of its except branch, a KeyboardInterrupt traceback and 130, not 129."""
    result = run_code(SIGHUP_AS_IT_LOOKS)
    assert (result.returncode, result.stderr) == (129, "")


# waits for its terminal to hang up (a session of its own: no SIGHUP comes), then fails as
# sys.argv[1] says ("last line": leaves a line without its line break in stdout's buffer, a
# terminal's flushing at one, for run_main's last flush); sys.argv[2] "late": a line on
# stderr after run_main returned
FAILS_AFTER_A_HANG_UP = """
import errno, sys, termios, time
from common.cli import run_main
def body():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            termios.tcgetattr(1)
        except termios.error:
            break  # the hang-up: a hung-up terminal's ioctls fail with EIO
        time.sleep(0.01)
    if sys.argv[1] == "last line":
        sys.stdout.write("final test accuracy 94.00%")
        return
    code = errno.ENOSPC if sys.argv[1] == "full disk" else errno.EIO
    raise OSError(code, "failed", "/data/run/ckpt.pt")
code = run_main(body)
if sys.argv[2] == "late":
    print("a line after the command, from what still runs", file=sys.stderr)
sys.exit(code)
"""


def run_on_a_terminal_that_hangs_up(*args: str, stderr_apart: bool = False) -> int:
    """FAILS_AFTER_A_HANG_UP with stdout and stderr on a pty whose other side closes at
    once (stderr_apart: stderr on a pipe, where nothing may be said); its exit status. Its
    streams buffered, as a user's are (not by PYTHONUNBUFFERED)."""
    terminal, run_side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", FAILS_AFTER_A_HANG_UP, *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=run_side,
                            stderr=subprocess.PIPE if stderr_apart else run_side, text=True,
                            start_new_session=True, env={
                                k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    os.close(run_side)
    os.close(terminal)  # the hang-up
    said = proc.communicate(timeout=120)[1]
    assert not said, said
    return proc.returncode


def test_a_full_disk_while_the_terminal_has_hung_up_is_a_failure_not_a_stop():
    """Only a write's EIO is the terminal's hang-up: a full disk at the same time is the
    command's failure (1), not a stop by SIGHUP (129), whatever the terminal."""
    assert run_on_a_terminal_that_hangs_up("full disk", "") == 1
    assert run_on_a_terminal_that_hangs_up("eio", "") == 129


def test_after_a_hang_up_both_streams_write_to_dev_null():
    """A hung-up terminal's stdout and stderr are both sent to /dev/null, not only the first
    looked at: what writes to stderr after (a finalizer's or a library's line at exit) then
    failed with EIO in turn, a traceback no one sees and exit 1 where the hang-up gives 129."""
    assert run_on_a_terminal_that_hangs_up("eio", "late") == 129


def test_a_hang_up_met_by_the_last_flush_of_stdout_is_a_stop_with_stderr_elsewhere():
    """`train.py 2> err.log` in a terminal that closes: the flush of what stdout still held
    fails with the terminal's EIO, a hang-up (129) as any write's EIO is; had write_stdout
    pointed stdout at /dev/null before run_main looked, no stream was a hung-up terminal
    any more, and the command failed (1) with an error line in err.log."""
    assert run_on_a_terminal_that_hangs_up("last line", "", stderr_apart=True) == 129


# a disk's EIO, with stdout's reader gone (`| head`)
DISK_EIO = """
import errno, sys
from common.cli import run_main
def body():
    raise OSError(errno.EIO, "Input/output error", "/data/train.beton")
sys.exit(run_main(body))
"""


def test_a_disk_eio_with_a_pipe_reader_gone_is_said_not_taken_for_a_hang_up():
    """A pipe whose reader has gone polls as an error, as a hung-up terminal does: a disk's
    EIO then ended the command as a closed terminal's SIGHUP, 129 and nothing said on a
    stderr someone still reads."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-c", DISK_EIO], cwd=ROOT, stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 1, result.stderr
    assert "/data/train.beton: Input/output error" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_in_report_is_one_line_and_leaves_no_temporary_folder(finished, tmp_path, stop,
                                                                     code):
    """Ctrl-C, and SIGTERM as timeout, Slurm and docker stop send it, stop as cleanly."""
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "report.py"),
                             str(finished / "ckpt.pt"), "--out", str(out), "-n", "40",
                             "--methods", "gradcam", "gradcam++", "layercam", "--layers",
                             "layer1", "layer2", "layer3", "layer4"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: list(tmp_path.glob(".report.*.tmp")), 300,
               "the report never made its temporary folder", process=proc, interval=0.05)
    time.sleep(1)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code and stderr.strip() == "interrupted", stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- impossible values --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("option, message", [
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    # past float32's largest: a traceback from the optimizer's first step
    (["--lr", "1e39"], "--lr must be a positive finite number no larger than 3.4e+38"),
    (["--weight-decay", "1e39"], "--weight-decay must be a finite number >= 0 no larger than"),
    (["--seed", str(2**64)], "--seed must be in 0..4294967295"),
    (["--cutout", "40"], "--cutout in 0..32"),
    (["--dataset", "synthetic", "--synthetic-size", "9", "100"], "--synthetic-size 9 100: the "
     "synthetic data needs at least 10 training images, one per class, and 1 test image"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--lr", "-1"], "--lr must be a positive finite number"),
    (["--lr", "fast"], "expected a number or 'auto'"),
    (["--translate", "40"], "--translate must be in 0..16"),
    (["--compile-mode", "reduce-overhead", "--no-compile"],
     "--compile-mode reduce-overhead compiles; drop --no-compile"),
])
def test_impossible_values_are_refused_before_anything_is_written(option, message, tmp_path):
    """In one line (not argparse's whole usage first), exit 2, nothing written: no run folder,
    no data."""
    out, data = tmp_path / "out", tmp_path / "data"
    result = train(*option, "--out", out, "--data-dir", data, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.startswith("engine/train.py: error: ") and \
        result.stderr.endswith("; see --help\n") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and not out.exists() and not data.exists()


def test_a_seed_is_taken_up_to_the_largest_numpys_and_torchs_generators_take():
    """--seed's range is 0..2**32-1 inclusive: its last value is taken, one past it refused."""
    assert seed_problem(0) is None and seed_problem(2**32 - 1) is None
    for seed in (-1, 2**32):
        assert seed_problem(seed) == f"--seed must be in 0..4294967295, got {seed}"


@pytest.mark.slow
def test_a_checkpoint_with_the_marker_but_wrong_types_is_refused(finished, tmp_path, capsys):
    """train --resume by a real subprocess, the report in this process."""
    ckpt = checkpoint.load(finished / "ckpt.pt")
    ckpt["classes"] = 5
    ckpt["mean"] = "0.5"
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "ckpt.pt")
    for result in (train("--resume", run, timeout=120),
                   in_process(capsys, report_command.main, run / "ckpt.pt")):
        assert result.returncode == 1
        message = one_line_error(result)
        assert str(run / "ckpt.pt") in message and "malformed classes, mean" in message


@pytest.mark.slow
@pytest.mark.parametrize("field, damage", [
    ("width", lambda c: c.update(width=True)),  # an int to Python, never a width
    ("width", lambda c: c.update(width=0)),  # a model of no channels
    ("classes", lambda c: c.update(classes=c["classes"][:9])),  # 9 names for 10 outputs
    ("classes", lambda c: c["classes"].append("extra")),  # 11 names for 10 outputs
    ("config", lambda c: c["config"].update(bogus=1)),  # TrainConfig(**config) would fail
    ("state_dict", lambda c: c.update(state_dict={"w": 1})),  # weights that are no tensors
    ("state_dict", lambda c: c["state_dict"].update(  # weights the engine never saves
        {"fc.weight": c["state_dict"]["fc.weight"].int()})),
    ("std", lambda c: c.update(std=[0.0, 0.2, 0.2])),  # normalizing would divide by 0
    ("std", lambda c: c.update(std=[1e-300, 0.2, 0.2])),  # and by this, overflow to inf
    ("mean", lambda c: c.update(mean=[float("nan"), 0.5, 0.5])),
    ("mean", lambda c: c.update(mean=[0.5, 0.5])),  # one value per RGB channel
    ("mean", lambda c: c.update(mean=[True, 0.5, 0.5])),  # a bool is an int, never a mean
    ("history", lambda c: c["history"][0].pop("test_acc")),  # the report's headline reads it
    ("history", lambda c: c["history"][0].pop("epoch")),  # and the epoch of it
    ("history", lambda c: c["history"][0].pop("lr")),  # and the curves the LR
    ("data", lambda c: c["data"].update(test=5)),  # the report finds the test split there
    ("data", lambda c: c["data"].pop("source")),  # --resume names it on a class mismatch
    # the training state: torch's load_state_dict raised AttributeError (a traceback) on the
    # first, took the second and failed at the first step; a tensor of processes a traceback
    ("resume", lambda c: c["resume"]["optimizer"].update(state=[])),
    ("resume", lambda c: c["resume"]["optimizer"]["state"].update({0: 5})),
    ("resume", lambda c: c["resume"].update(rng=torch.zeros(3))),
    ("resume", lambda c: c["resume"].update(rng=5)),  # its dtype read: an AttributeError
    ("processes", lambda c: c.update(processes=torch.tensor(2))),
    # compared with the names' count, a tensor of two was a RuntimeError traceback
    ("num_classes", lambda c: c.update(num_classes=torch.ones(2))),
    ("resume", lambda c: c.update(resume={})),
    ("resume", lambda c: c.update(resume=[1, 2])),
    # hand edits the tools took: a name that breaks predict's table and the report's columns,
    # a config of defaults the run never had, epochs no run numbers so, no epoch at all
    ("classes", lambda c: c["classes"].__setitem__(3, "c\tat")),
    ("classes", lambda c: c["classes"].__setitem__(3, " ")),
    ("config", lambda c: c.update(config={})),
    ("config", lambda c: c["config"].pop("epochs")),
    ("history", lambda c: c["history"][0].update(epoch=-1)),
    ("history", lambda c: c["history"][0].update(epoch=1.5)),
    ("history", lambda c: c["history"].append({**c["history"][-1], "epoch": 5})),
    ("history", lambda c: c.update(history=[])),
], ids=["width True", "width 0", "9 of 10 classes", "11 of 10 classes", "unknown config key",
        "int weight", "int32 weights",
        "std 0", "std 1e-300", "mean NaN", "mean of 2", "mean of a bool", "no test_acc",
        "no epoch", "no lr",
        "data test 5", "data without source", "optimizer state a list",
        "optimizer state of a number", "rng of floats", "rng a number", "processes a tensor",
        "num_classes a tensor", "resume empty", "resume a list", "class name with a tab",
        "blank class name", "config empty", "config without epochs", "epoch -1", "epoch 1.5",
        "epochs 1, 2, 5", "no history"])
def test_every_field_the_tools_read_is_checked_on_load(finished, tmp_path, field, damage):
    ckpt = checkpoint.load(finished / "ckpt.pt")
    damage(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=f"malformed {field};"):
        checkpoint.load(tmp_path / "ckpt.pt")


@pytest.mark.slow
def test_a_config_from_before_the_later_fields_loads_with_their_defaults(finished, tmp_path):
    """Version-1 checkpoints written before TrainConfig gained a field stay readable."""
    ckpt = checkpoint.load(finished / "ckpt.pt")
    for key in checkpoint.LATER_CONFIG_KEYS:
        del ckpt["config"][key]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(tmp_path / "ckpt.pt")
    cfg = checkpoint.checked_config(tmp_path / "ckpt.pt", loaded,
                                    lambda: TrainConfig(**loaded["config"]), fix="")
    assert cfg.to_dict() == {**ckpt["config"], **{
        key: getattr(TrainConfig(), key) for key in checkpoint.LATER_CONFIG_KEYS}}


@pytest.mark.slow
def test_non_finite_weights_are_refused_by_every_tool(finished, tmp_path, capsys):
    """predict used to print 'nan%' and exit 0, and --resume to call the bad epoch good.
    train --resume by a real subprocess, predict in this process."""
    run = copy_run(finished, tmp_path)
    path = _damaged(run, lambda ckpt: ckpt["state_dict"]["layer1.0.conv1.weight"].fill_(
        float("nan")))
    for result in (train("--resume", run, "--epochs", "2", timeout=120),
                   in_process(capsys, predict_command.main, path, ROOT / "docs" / "curves.png")):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert one_line_error(result) == (
            f"error: {path} holds NaN or infinite weights (layer1.0.conv1.weight); "
            "engine/train.py never saves such a state, so it was damaged or written by other "
            "code. Use another checkpoint, e.g. the run's best.pt.")


@pytest.mark.slow
def test_a_model_giving_nan_logits_is_refused_by_every_tool(finished, tmp_path, capsys):
    """Finite weights too large to compute with: predict printed 'nan%' and report wrote a
    whole report of NaN, both exiting 0 (export alone refused). predict by a real subprocess,
    report and export in this process."""
    run = copy_run(finished, tmp_path)
    path = _damaged(run, lambda ckpt: ckpt["state_dict"]["stem.0.weight"].mul_(3e38))
    for result in (run_script("tools/predict.py", path, ROOT / "docs" / "curves.png"),
                   in_process(capsys, report_command.main, path, "--out", tmp_path / "report"),
                   in_process(capsys, export_command.main, path, "--format", "safetensors")):
        assert result.returncode == 1, result.stderr[-3000:]
        assert one_line_error(result) == (
            f"error: {path}'s model gives NaN or infinite logits; its weights are broken (a "
            "diverged run?). Use another checkpoint, e.g. the run's best.pt.")
    assert sorted(p.name for p in run.iterdir()) == sorted(checkpoint.EPOCH_FILES)
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage, words", [
    # the model of an edited width was built before its weights were compared: at 4096 it
    # filled the machine's memory until the kernel killed the process
    (lambda c: c.update(width=4096), "do not fit a resnet18 of width 4096 with 10 classes (101 "
                                     "of its tensors, such as stem.0.weight: 8x3x3x3 where the "
                                     "model has 4096x3x3x3)"),
    (lambda c: c["state_dict"].update(extra=torch.zeros(())),
     "(1 of its tensors, such as extra: a scalar where the model has none)"),
    (lambda c: c["state_dict"]["stem.1.running_var"].fill_(-1),
     "holds negative BatchNorm variances (stem.1.running_var)"),
    # no model to compare with: build_model's ValueError, the meta device's RuntimeError for a
    # width whose tensors no int64 can size, and torch's TypeError for a width no int64 holds
    (lambda c: c.update(arch="vgg"), "do not fit a vgg of width 8 with 10 classes (ValueError: "
                                     "unknown arch 'vgg'; choose one of resnet18)"),
    (lambda c: c.update(width=2**40), "do not fit a resnet18 of width 1099511627776 with 10 "
                                      "classes (RuntimeError: Storage size calculation "
                                      "overflowed"),
    (lambda c: c.update(width=10**30), f"do not fit a resnet18 of width {10**30} with 10 "
                                       "classes (TypeError: "),
], ids=["width 4096", "a tensor too many", "negative variance", "unknown arch",
        "width of tensors past int64", "width past int64"])
def test_weights_that_misfit_their_model_are_refused_on_load(finished, tmp_path, damage, words):
    """Refused in words naming the file, however the model it names fails to be built."""
    ckpt = checkpoint.load(finished / "ckpt.pt")
    damage(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(tmp_path / "ckpt.pt")
    assert words in str(refused.value)


@pytest.mark.slow
def test_a_batchnorm_variance_of_exactly_zero_loads(finished, tmp_path):
    """A channel no input ever reaches decays its running variance to 0.0 in fp32 over a long
    run: a state training saves, so load takes it (only a negative variance is damage)."""
    ckpt = checkpoint.load(finished / "ckpt.pt")
    ckpt["state_dict"]["stem.1.running_var"][0] = 0.0
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(tmp_path / "ckpt.pt")
    assert loaded["state_dict"]["stem.1.running_var"][0].item() == 0.0


@pytest.mark.slow
def test_a_checkpoint_of_another_version_is_refused_naming_both(finished, tmp_path):
    ckpt = checkpoint.load(finished / "ckpt.pt")
    ckpt["version"] = 2  # otherwise whole: only the version tells it apart
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(tmp_path / "ckpt.pt")
    assert str(refused.value) == (f"{tmp_path / 'ckpt.pt'} has checkpoint version 2; this "
                                  "engine reads version 1. Read it with the cifar10-engine that "
                                  "wrote it, or train a new run with this one.")


@pytest.mark.parametrize("content, message", [
    ({"format": checkpoint.FORMAT, "version": checkpoint.VERSION},
     "lacks arch, width, num_classes, state_dict, classes, mean, std, config, history, data; "
     "it is incomplete (edited, or written by other code). Use the ckpt.pt that "
     "engine/train.py wrote."),
    ([checkpoint.FORMAT, checkpoint.VERSION],
     f"is not a cifar10-engine checkpoint (no '{checkpoint.FORMAT}' marker); use the ckpt.pt "
     "that engine/train.py wrote."),
    # another tool's file with a format key of its own: not ours, whatever else it holds
    ({"format": "other-tool/ckpt", "version": checkpoint.VERSION},
     f"is not a cifar10-engine checkpoint (no '{checkpoint.FORMAT}' marker); use the ckpt.pt "
     "that engine/train.py wrote."),
    # a version before ours, as well as after it
    ({"format": checkpoint.FORMAT, "version": 0},
     f"has checkpoint version 0; this engine reads version {checkpoint.VERSION}. Read it with "
     "the cifar10-engine that wrote it, or train a new run with this one."),
    # no version this engine writes: compared with 1, a tensor of two was a RuntimeError
    # traceback ('Boolean value of Tensor with more than one value is ambiguous')
    ({"format": checkpoint.FORMAT, "version": torch.ones(2, dtype=torch.int64)},
     f"has checkpoint version of type Tensor; this engine reads version {checkpoint.VERSION}."),
    ({"format": checkpoint.FORMAT, "version": True},  # == 1 to Python
     f"has checkpoint version of type bool; this engine reads version {checkpoint.VERSION}."),
], ids=["marker and version only", "a list", "another format", "version 0", "version a tensor",
        "version True"])
def test_a_checkpoint_that_is_no_whole_dict_is_refused(tmp_path, content, message):
    """Refused in words, not with the KeyError, AttributeError or RuntimeError of reading it."""
    torch.save(content, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(tmp_path / "ckpt.pt")
    assert str(refused.value).startswith(f"{tmp_path / 'ckpt.pt'} {message}")


@pytest.mark.slow
def test_resume_from_a_copy_of_best_pt_is_one_clear_error(finished, tmp_path):
    """best.pt holds the weights but no optimizer state: resuming from it (copied over
    ckpt.pt) is refused in one line, in-process as engine/train.py calls it."""
    run = copy_run(finished, tmp_path)
    shutil.copyfile(run / "best.pt", run / "ckpt.pt")
    before = (run / "ckpt.pt").read_bytes()
    with pytest.raises(CheckpointError) as refused:
        train_run(TrainConfig(), run, {"epochs": 2})
    assert str(refused.value) == (f"{run / 'ckpt.pt'} has no optimizer state (best.pt?); "
                                  "resume from the run's ckpt.pt")
    assert (run / "ckpt.pt").read_bytes() == before and len(read_history(run)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name, block, problem", [
    ("best.pt", os.mkdir, "is a folder"),
    ("metrics.csv", os.mkfifo, "is a device, pipe or socket, not a file"),
], ids=["best.pt a folder", "metrics.csv a pipe"])
def test_resume_refuses_a_run_file_taken_by_no_file_before_training(finished, tmp_path, name,
                                                                    block, problem):
    """The epoch's write would fail after its training (said once as 'make the folder
    writable'): the run's files are checked first, and each epoch writes exactly these."""
    assert sorted(p.name for p in finished.iterdir()) == sorted(checkpoint.EPOCH_FILES)
    run = copy_run(finished, tmp_path)
    (run / name).unlink()
    block(run / name)
    with pytest.raises(CheckpointError) as refused:
        train_run(TrainConfig(), run, {"epochs": 2})
    assert str(refused.value) == (f"{run / name} {problem}; each epoch of the run writes its "
                                  f"{name} there. Move it away and resume again.")
    assert len(read_history(run)) == 1


def _damaged(run: Path, change, name: str = "ckpt.pt") -> Path:
    """run's ckpt.pt (or file `name`) with change(ckpt) applied, saved back as torch.save
    writes it."""
    path = run / name
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("key, value, problem", [
    ("batch_size", "abc", "batch_size is 'abc', not <class 'int'>"),
    ("epochs", True, "epochs is True, not <class 'int'>"),  # a bool is an int to Python
    ("workers", False, "workers is False, not int | None"),
    ("synthetic_size", "x", "synthetic_size is ('x',), not tuple[int, int]"),
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("lr", float("nan"), "--lr must be a positive finite number no larger than 3.4e+38 (the "
                         "float32 weights' largest) or 'auto', got nan"),
    ("translate", 99, "--translate must be in 0..16"),
    ("dataset", "imagenet", "dataset is 'imagenet', not one of cifar10, cifar100"),
    ("optimizer", "foo", "optimizer is 'foo', not one of sgd, nesterov"),
    ("log_with", "foo", "log_with is 'foo', not one of all, "),  # accelerate's names
    ("width", 16, "its config's resnet18 of width 16 is not its weights' resnet18 of width"),
    # compared with the weights' width, a tensor of two was a RuntimeError traceback
    ("width", torch.ones(2), "width is tensor([1., 1.]), not <class 'int'>"),
    # a repr of many lines (a thousand characters), cut to its first 80 of one
    ("width", torch.ones(100, 2), "width is tensor([[1., 1.], [1., 1.], [1., 1.], [1., 1.], "
                                  "[1., 1.], [1., 1.], [1., 1.], [1..., not <class 'int'>"),
    ("dataset", "cifar100", "its data is 'synthetic', its config's dataset 'cifar100'"),
])
def test_a_resumed_config_no_run_could_have_is_refused_naming_it(finished, tmp_path, key, value,
                                                                 problem):
    """A damaged or edited ckpt.pt config: one message, before anything is built (each of
    these was a traceback from deep inside the run)."""
    run = copy_run(finished, tmp_path)
    path = _damaged(run, lambda ckpt: ckpt["config"].update({key: value}))
    with pytest.raises(CheckpointError) as refused:
        configure(TrainConfig(), run, {})
    assert str(refused.value).startswith(f"{path} holds a config no run could have (")
    assert problem in str(refused.value) and "damaged or edited" in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("trained, mode, resumed", [
    (("NVIDIA H200", 1), "reduce-overhead", "default"),  # its machine's pick: picked again here
    (("NVIDIA H200", 1), "default", "default"),  # asked for on one GPU, where graphs are the pick
    (("NVIDIA H200", 1), "max-autotune", "max-autotune"),  # asked for
], ids=["picked", "asked for default", "asked for max-autotune"])
def test_a_compile_mode_the_machine_picked_is_picked_again_on_resume(finished, tmp_path,
                                                                      trained, mode, resumed):
    """A run compiled on one GPU took CUDA graphs by default; resumed elsewhere (here the CPU;
    on several GPUs alike) the mode is this launch's default, while one asked for is kept."""
    run = copy_run(finished, tmp_path)
    device, processes = trained
    _damaged(run, lambda ckpt: (ckpt.update(device=device, processes=processes),
                                ckpt["config"].update(compile=True, compile_mode=mode)))
    cfg, _ = configure(TrainConfig(), run, {})
    assert (cfg.compile, cfg.compile_mode) == (True, resumed)
    cfg, _ = configure(TrainConfig(), run, {"compile_mode": "max-autotune"})
    assert cfg.compile_mode == "max-autotune"  # given on the command line: always taken


def test_no_compile_on_resume_leaves_no_compile_mode_behind(finished, tmp_path):
    """--resume may change --compile: --no-compile on a run compiled in max-autotune goes on
    eagerly, not refused as a config whose compile mode asks for the compiling it turned off."""
    run = copy_run(finished, tmp_path)
    _damaged(run, lambda ckpt: ckpt["config"].update(compile=True, compile_mode="max-autotune"))
    cfg, _ = configure(TrainConfig(), run, {"compile": False})
    assert (cfg.compile, cfg.compile_mode) == (False, "default")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where a CUDA GPU is")
def test_an_fp16_run_is_resumed_only_where_fp16_can_run(finished, tmp_path):
    """No advice to pick another --precision, which --resume refuses: a GPU is the way on."""
    run = copy_run(finished, tmp_path)
    path = _damaged(run, lambda ckpt: ckpt["config"].update(precision="fp16"))
    with pytest.raises(TrainingError, match="trained in fp16, which needs a CUDA GPU; resume it "
                                            "on a machine with one") as refused:
        configure(TrainConfig(), run, {})
    assert str(path) in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("change, cause", [
    (lambda ckpt: ckpt["resume"]["optimizer"].update(param_groups=[]), "ValueError"),
    (lambda ckpt: ckpt["resume"].update(scheduler={"foo": 1}), "KeyError"),
    # taken by load_state_dict; the first step then failed in a traceback
    (lambda ckpt: ckpt["resume"]["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
     "ValueError: a saved momentum_buffer of shape (3,) for a parameter of shape (8, 3, 3, 3)"),
    # uint8, as load checks: torch's generator refuses its size
    (lambda ckpt: ckpt["resume"].update(rng=torch.zeros(3, dtype=torch.uint8)),
     "RuntimeError: Expected a CPUGeneratorImplState of size"),
], ids=["optimizer groups", "scheduler", "momentum of another shape", "rng of another size"])
def test_a_damaged_training_state_is_refused_on_resume(finished, tmp_path, change, cause):
    """Damage of the right types (load's checks pass it) that does not fit the run."""
    run = copy_run(finished, tmp_path)
    path = _damaged(run, change)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as refused:
        train_run(TrainConfig(), run, {"epochs": 2})
    assert str(refused.value).startswith(f"{path}'s saved training state does not fit its run "
                                         f"({cause}")
    assert str(refused.value).endswith(
        "; it was damaged or written by other code. Resume from the ckpt.pt that engine/train.py "
        "wrote, or start a new run with another --out."), refused.value
    assert path.read_bytes() == before and len(read_history(run)) == 1


def test_restore_goes_on_with_the_random_state_the_checkpoint_saved(prepared, tmp_path):
    """--loader torchvision --workers 0 draws its crops, flips and Cutout from torch's global
    generator in this process: a resumed run must go on from the state its checkpoint saved,
    not from whatever building the run left, or its epochs are not the uninterrupted run's."""
    run = small_run(prepared, tmp_path)
    row = dict.fromkeys(checkpoint.HISTORY_KEYS, 0.5) | {"epoch": 1}
    saved = checkpoint.content(run, [row])
    torch.rand(100)  # the process draws on after the save (or a new process starts elsewhere)
    assert not torch.equal(torch.get_rng_state(), saved["resume"]["rng"])
    assert checkpoint.restore(run, saved, tmp_path / "ckpt.pt") == [row]
    assert torch.equal(torch.get_rng_state(), saved["resume"]["rng"])


def test_restore_goes_on_at_the_lr_of_the_uninterrupted_run_after_its_epochs(prepared,
                                                                              tmp_path):
    """A checkpoint of 2 epochs resumes its schedule after 2 epochs' steps: the first resumed
    step trains at the uninterrupted run's LR there, not at the LR after epoch 1."""
    rows = [dict.fromkeys(checkpoint.HISTORY_KEYS, 0.5) | {"epoch": e} for e in (1, 2)]
    saved = checkpoint.content(small_run(prepared, tmp_path / "a", epochs=4), rows)
    uninterrupted = small_run(prepared, tmp_path / "b", epochs=4)
    lrs = []  # the LR after each epoch of steps
    for _ in range(2):
        for _ in range(len(uninterrupted.train_loader)):
            uninterrupted.optimizer.step()  # no gradients: only the schedule moves
            uninterrupted.scheduler.step()
        lrs.append(uninterrupted.optimizer.param_groups[0]["lr"])
    assert lrs[0] != pytest.approx(lrs[1])  # the schedule tells the epochs apart
    resumed = small_run(prepared, tmp_path / "c", epochs=4)
    checkpoint.restore(resumed, saved, tmp_path / "ckpt.pt")
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[1], rel=1e-6)
    assert resumed.scheduler.last_epoch == uninterrupted.scheduler.last_epoch


@pytest.mark.slow
def test_running_out_of_memory_while_restoring_is_no_damaged_checkpoint(finished, tmp_path,
                                                                       monkeypatch):
    """A GPU too full for the optimizer's state is named as such, not as a damaged file
    (restore's CheckpointError keeps the OutOfMemoryError as its context, which train reads)."""
    run = copy_run(finished, tmp_path)

    def full(*args) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(checkpoint, "load_optimizer", full)
    with pytest.raises(TrainingError, match=r"^out of memory at --batch-size \d+; try"):
        train_run(TrainConfig(), run, {"epochs": 2})


def test_a_run_resumed_on_another_process_count_goes_on_at_its_epochs(finished, tmp_path):
    """A run of 2 processes (half the steps an epoch) resumed on 1: the saved step count put
    the schedule mid-way through the first epoch again, so it never reached its end. It goes
    on from the epochs done, in this run's steps, and says the global batch changed."""
    run = copy_run(finished, tmp_path)
    steps = torch.load(run / "ckpt.pt", weights_only=True)["resume"]["scheduler"]["last_epoch"]

    def on_two(ckpt: dict) -> None:
        ckpt["resume"]["scheduler"]["last_epoch"] = (steps + 1) // 2
        ckpt["processes"] = 2

    _damaged(run, on_two)
    said = []
    trained = train_run(TrainConfig(), run, {"epochs": 2}, log=said.append)
    assert f"{run / 'ckpt.pt'} trained on 2 processes, this run has 1: its steps now take 1 x " \
           in "\n".join(said)
    assert trained.history[-1]["lr"] == 0  # the triangle's end: 2 epochs of this run's steps


def test_a_folder_where_the_run_lock_belongs_is_named_as_a_folder(finished, tmp_path):
    """open()'s EISDIR came out as 'cannot use RUN/.lock: Is a directory. Check that the path
    exists, is writable ...', advice that fits no folder."""
    run = copy_run(finished, tmp_path)
    (run / ".lock").mkdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = train("--resume", run, "--epochs", "2", timeout=300)
    assert result.returncode == 1
    assert one_line_error(result) == (f"error: cannot use {run / '.lock'}: it is a folder where "
                                      "a file belongs; move it away, or choose another path.")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_from_a_folder_without_a_checkpoint_asks_for_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"--resume {tmp_path}: {tmp_path / 'ckpt.pt'} "
                                              "does not exist; pass the --out folder of a run"):
        configure(TrainConfig(), tmp_path, {})


def test_a_folder_given_as_a_checkpoint_names_the_file_to_pass(tmp_path):
    with pytest.raises(CheckpointError) as refused:  # a folder that is no run folder
        checkpoint.load(tmp_path)
    assert str(refused.value) == (f"{tmp_path} is a folder; pass a checkpoint file (a run's "
                                  "ckpt.pt or best.pt).")
    (tmp_path / "ckpt.pt").write_bytes(b"")  # a run folder: its checkpoint is named
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(tmp_path)
    assert str(refused.value) == (f"{tmp_path} is a folder; pass a checkpoint file, such as "
                                  f"{tmp_path / 'ckpt.pt'}.")


class Pickled:
    """A class a foreign checkpoint pickles: a weights-only load refuses it."""


class RunsCode:
    """What a malicious checkpoint pickles: a call of os.system."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("content, reason", [
    (b"# notes\n", "a weights-only load refuses it: Unsupported operand"),
    (lambda path: torch.save({"model": Pickled()}, path),
     "a weights-only load refuses it: Unsupported global: GLOBAL test_reliability.Pickled"),
    (lambda path: torch.save({"model": RunsCode()}, path),  # torch words this refusal apart
     "a weights-only load refuses it: Trying to load unsupported GLOBAL posix.system whose "
     "module posix is blocked)"),
    (lambda path: torch.save({"w": torch.zeros(1000)}, path) or path.write_bytes(
        path.read_bytes()[:2000]), "RuntimeError: PytorchStreamReader failed reading zip"),
    (b"", "(EOFError)")], ids=["text", "pickled class", "code", "truncated", "empty"])
def test_an_unreadable_checkpoint_gets_the_reason_never_advice_to_unpickle_it(
        tmp_path, content, reason):
    """torch wraps the weights-only unpickler's reason in advice to load with
    weights_only=False, which runs any code the file holds: only the reason is passed on."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content) if isinstance(content, bytes) else content(path)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path} is not a readable checkpoint (") and reason in message
    assert message.endswith("). It may be truncated or come from another tool; use the ckpt.pt "
                            "that engine/train.py wrote.")  # the fix, whatever torch said
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.filterwarnings("error")
def test_a_foreign_pickle_is_refused_without_torchs_warnings(tmp_path):
    """torch warns about a plain pickle's protocol (advice to its author, over lines of
    stderr before the one-line error): not passed on."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="refuses it: Unsupported operand 149"):
        checkpoint.load(path)


@pytest.mark.slow
def test_report_refuses_a_layer_without_feature_maps(finished, tmp_path):
    result = run_script("tools/report.py", finished / "ckpt.pt", "--layers", "fc", "--out",
                        tmp_path / "report", timeout=120)
    assert result.returncode == 1
    assert "--layers fc: that layer holds no convolution, whose feature map a CAM explains" \
        in one_line_error(result)
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_the_shapes_that_crashed_torch_train_and_report(tmp_path):
    """Width 8 with a batch of 63 and an odd last batch segfaulted in the backward pass, and
    report.py aborted computing CAMs of a width-8 model (engine.model.PointwiseConv). The
    resident loader: without PointwiseConv, training crashes with it as with FFCV's (the
    model's channels_last layers, not the loader, give the kernel its input), which takes
    seconds more to compile."""
    out = tmp_path / "run"
    result = run_script("engine/train.py", "--dataset", "synthetic", "--synthetic-size", "515",
                        "256", "--width", "8", "--batch-size", "63", "--epochs", "1",
                        "--loader", "resident", "--data-dir", tmp_path / "data", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("tools/report.py", out / "ckpt.pt", "-n", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".report")) == []


def test_resume_rules_apply_what_can_change_and_name_the_rest():
    """engine.resume.resume_config on its own: every option typed is either applied or named."""
    from engine.options import parse
    from engine.resume import RESUMABLE, resume_config

    saved = parse(["--dataset", "synthetic", "--epochs", "2"]).cfg.to_dict()
    given = parse(["--epochs", "5", "--workers", "1", "--preset", "seed", "--lr", "0.3"]).given
    with pytest.raises(ValueError, match="--lr, --preset cannot change") as error:
        resume_config(saved, given, Path("runs/x"))
    assert all(f"--{k.replace('_', '-')}" in str(error.value) for k in RESUMABLE)
    cfg = resume_config(saved, {"epochs": 5, "workers": 1}, Path("runs/x"))
    assert (cfg.epochs, cfg.workers, cfg.out, cfg.dataset) == (5, 1, "runs/x", "synthetic")
    same = resume_config(saved, {"dataset": "synthetic", "synthetic_size": (50_000, 10_000)},
                         Path("runs/x"))  # repeating a saved value is no change
    assert same.synthetic_size == (50_000, 10_000)
    # its own folder however written, whatever folder the saved config names (where the run
    # was last resumed from); never another folder
    for out in ("runs/x", "./runs/x/", Path.cwd() / "runs" / "x", "runs/y/../x"):
        assert resume_config({**saved, "out": "../elsewhere/runs/x"}, {"out": str(out)},
                             Path("runs/x")).out == "runs/x"
    with pytest.raises(ValueError, match="--out cannot change when resuming runs/x"):
        resume_config(saved, {"out": "runs/y"}, Path("runs/x"))


def test_resuming_a_deterministic_run_refuses_cudnn_benchmark_unless_determinism_goes_too():
    """A --deterministic run never autotunes: --cudnn-benchmark on its resume would be taken
    and ignored, so it is refused, as beside --deterministic in a new run; with
    --no-deterministic it is taken."""
    from engine.options import parse
    from engine.resume import resume_config

    saved = parse(["--deterministic"]).cfg.to_dict()
    with pytest.raises(ValueError, match="--cudnn-benchmark times cuDNN's algorithms, which "
                                         "--deterministic rules out .resuming runs/x"):
        resume_config(saved, {"cudnn_benchmark": True}, Path("runs/x"))
    with pytest.raises(ValueError, match="pass --no-deterministic too"):
        resume_config(parse([]).cfg.to_dict(), {"cudnn_benchmark": True, "deterministic": True},
                      Path("runs/x"))
    cfg = resume_config(saved, {"cudnn_benchmark": True, "deterministic": False}, Path("runs/x"))
    assert cfg.autotunes()


def test_resuming_an_lr_auto_run_takes_its_command_again():
    """A --lr auto run saves the LR it found: the same command with --resume repeats 'auto',
    which is the saved LR's origin, not a change (it was refused as '--lr cannot change')."""
    from engine.options import parse
    from engine.resume import resume_config

    found = {"suggested": 0.0123, "steepest": 0.004}
    saved = {**parse(["--lr", "auto"]).cfg.to_dict(), "lr": 0.0123, "lr_auto": found}
    cfg = resume_config(saved, parse(["--lr", "auto", "--epochs", "30"]).given, Path("runs/x"))
    assert (cfg.lr, cfg.lr_auto, cfg.epochs) == (0.0123, found, 30)
    fixed = {**saved, "lr_auto": None}  # a run at a fixed LR did not come from the range test
    with pytest.raises(ValueError, match="--lr cannot change"):
        resume_config(fixed, parse(["--lr", "auto"]).given, Path("runs/x"))

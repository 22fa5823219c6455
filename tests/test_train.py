"""engine/train.py end to end, as real subprocesses on synthetic data (CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    in_process,
    interrupt_after_first_epoch,
    launcher_env,
    run_script,
    torchrun_env,
    wait_until,
    with_head,
)

import engine.trackers
import engine.train as train_command
from common.errors import TrainingError
from engine import checkpoint
from engine.history import read_history
from engine.optimizers import lr_at
from loaders import beton

pytestmark = pytest.mark.slow  # every test here runs engine/train.py

TRAIN = [sys.executable, str(ROOT / "engine" / "train.py")]
SMALL = ["--dataset", "synthetic", "--width", "8", "--batch-size", "128", "--seed", "1"]
# the split the runs that stop, resume or save mid-run share, prepared once in data_dir: 5
# batches of 128, the last one short
SHARED_SPLIT = ["--synthetic-size", "600", "200"]


def train(*args, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return run_script("engine/train.py", *SMALL, *args, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def two_epoch_run(data_dir, tmp_path_factory) -> Path:
    """The CPU default path (ffcv loader, fp32, eager) on 4000 synthetic images (about 70 %
    test accuracy)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = train("--synthetic-size", "4000", "400", "--data-dir", str(data_dir),
                   "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_training_learns_and_writes_the_run_directory(two_epoch_run):
    rows = read_history(two_epoch_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_acc"] > 0.5  # chance is 0.1
    assert len((two_epoch_run / "metrics.csv").read_text().splitlines()) == 3  # header + 2
    config = json.loads((two_epoch_run / "config.json").read_text())
    assert config["loader"] == "ffcv" and config["precision"] == "fp32"
    # the LR after each epoch's last step, as the schedule gives it there: 0 at the end
    total = config["epochs"] * math.ceil(4000 / config["batch_size"])
    ends = [total * r["epoch"] // config["epochs"] for r in rows]
    assert [r["lr"] for r in rows] == pytest.approx([config["lr"] * lr_at(
        config["schedule"], step, total, config["warmup"]) for step in ends])
    assert rows[-1]["lr"] == 0.0
    ckpt = torch.load(two_epoch_run / "ckpt.pt", weights_only=True)
    assert ckpt["history"] == rows and ckpt["num_classes"] == 10 and ckpt["width"] == 8
    assert all(v.dtype != torch.bfloat16 for v in ckpt["state_dict"].values())
    best = checkpoint.load(two_epoch_run / "best.pt")
    assert best["history"][-1]["test_acc"] == max(r["test_acc"] for r in rows)
    assert "resume" not in best


def test_best_pt_is_kept_when_a_later_epoch_is_worse(two_epoch_run, tmp_path):
    """best.pt is rewritten only by an epoch that beats every earlier one: here the history
    resumed from holds a perfect epoch 1, so epoch 3 leaves best.pt as it was. Its best epoch
    not its last, the commonest run folder there is, best.pt's history is only the start of
    ckpt.pt's: of this run all the same, so the resume goes on (compared whole, the two
    histories differ, and it was refused as another run's)."""
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["history"][0]["test_acc"] = 1.0
    torch.save(ckpt, run / "ckpt.pt")
    # best.pt as such a run wrote it: epoch 1's, without the training state (its history
    # must begin ckpt.pt's, or the resume is refused as of another run's)
    best = {k: v for k, v in ckpt.items() if k != "resume"}
    torch.save({**best, "epoch": 1, "history": ckpt["history"][:1]}, run / "best.pt")
    before = (run / "best.pt").read_bytes()
    result = train("--resume", str(run), "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["test_acc"] < 1.0 for r in read_history(run)] == [False, True, True]
    assert (run / "best.pt").read_bytes() == before
    assert checkpoint.load(run / "ckpt.pt")["epoch"] == 3
    # the line names the last epoch, the run's result, then the best one, which best.pt holds
    third = read_history(run)[2]
    final = re.escape(f"{third['test_acc']:.2%}")
    assert re.search(rf"^final test accuracy {final} at epoch 3; best test "
                     r"accuracy 100\.00% at epoch 1 \(best\.pt, picked on the test set\); "
                     rf"saved {re.escape(str(run))}/ckpt\.pt", result.stdout,
                     re.MULTILINE), result.stdout
    # where the command's time went: the one epoch it trained, not the two it resumed from
    assert re.search(rf"^1 epoch: {third['seconds']:.1f}s of training, "
                     rf"{third['eval_seconds']:.1f}s of evaluation, "
                     r"\d+\.\ds waiting for checkpoints; \d+\.\ds building the run before them$",
                     result.stdout, re.MULTILINE), result.stdout


def test_reported_accuracy_matches_an_independent_evaluation(two_epoch_run):
    ckpt = checkpoint.load(two_epoch_run / "ckpt.pt")
    assert_reported_accuracy_matches(ckpt)


def normalized_split(ckpt: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images as the model sees them, normalized here by hand from the .beton's raw
    pixels (not by loaders.augment), in the run's memory format; and its labels."""
    raw = beton.read(Path(ckpt["data"][split]))
    mean, std = (torch.tensor(ckpt[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    images = (torch.from_numpy(raw.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    layout = torch.channels_last if ckpt["config"]["channels_last"] else torch.contiguous_format
    return images.contiguous(memory_format=layout), torch.from_numpy(raw.labels)


def assert_reported_accuracy_matches(ckpt: dict) -> None:
    """The last epoch's test accuracy and loss equal an evaluation written out here (flip TTA,
    argmax and loss by hand, not engine.evaluate's), at the run's test batch size."""
    images, labels = normalized_split(ckpt, "test")
    config = ckpt["config"]
    model = checkpoint.model_from(ckpt).eval()
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        batches = images.split(2 * config["batch_size"])  # the run's test batches
        logits = torch.cat([model(b) for b in batches])
        if config["tta"]:
            logits = (logits + torch.cat([model(b.flip(3)) for b in batches])) / 2
    last = ckpt["history"][-1]
    assert len(labels) == last["test_images"]
    correct = int((logits.argmax(1) == labels).sum())
    assert abs(correct - last["test_acc"] * len(labels)) <= 1  # a near tie may go either way
    assert F.cross_entropy(logits, labels).item() == pytest.approx(last["test_loss"], rel=1e-4)


def test_train_loss_and_accuracy_are_those_of_the_epochs_batches(data_dir, tmp_path):
    """One batch an epoch, no augmentation and a vanishing LR: the epoch's train loss and
    accuracy are then one train-mode forward of the whole split, computed here by hand."""
    out = tmp_path / "out"
    result = train("--synthetic-size", "256", "64", "--data-dir", str(data_dir), "--epochs", "1",
                   "--batch-size", "256", "--loader", "resident", "--no-flip", "--translate",
                   "0", "--lr", "1e-12", "--schedule", "constant", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoint.load(out / "ckpt.pt")
    images, labels = normalized_split(ckpt, "train")
    model = checkpoint.model_from(ckpt).to(memory_format=torch.channels_last).train()
    with torch.no_grad():
        logits = model(images)  # BatchNorm in train mode: the batch's own statistics
    row = ckpt["history"][0]
    assert row["train_images"] == len(labels) == 256
    loss = F.cross_entropy(logits, labels, label_smoothing=ckpt["config"]["label_smoothing"])
    assert row["train_loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert abs(row["train_acc"] * 256 - int((logits.argmax(1) == labels).sum())) <= 1


# engine/train.py (the second argument), each process writing two lines an epoch to
# RECORDS.<its rank> (RECORDS the first argument): the samples of the shard it trained, and
# its own sums of the loss, the correct answers and the images of its steps
EPOCHS_RECORDED = """
import runpy, sys
from engine import loop
records = sys.argv.pop(1)
train_epoch, train_step = loop.train_epoch, loop.train_step
sums = [0.0, 0, 0]
def summed_step(run, images, labels):
    loss, correct = train_step(run, images, labels)
    sums[0] += loss.item(); sums[1] += int(correct); sums[2] += len(labels)
    return loss, correct
def record_the_epoch(run, epoch, before_step):
    sums[:] = [0.0, 0, 0]
    row = train_epoch(run, epoch, before_step)
    with open(f"{records}.{run.accelerator.process_index}", "a") as f:
        f.write(" ".join(map(str, run.train_loader.indices().tolist())) + "\\n")
        f.write(" ".join(map(str, sums)) + "\\n")
    return row
loop.train_epoch, loop.train_step = record_the_epoch, summed_step
sys.argv[0] = sys.argv.pop(1)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_share_the_work_without_double_counting(data_dir, tmp_path):
    """Started as docs/training.md starts several GPUs, `accelerate launch --multi_gpu`: on a
    machine without one, its torchrun processes train on the CPU over gloo. (Its --cpu mode would
    start one process: accelerate's several CPU processes need an MPI hostfile.) Their training
    shards, recorded by a script around engine/train.py, hold every sample once and one more
    as padding between them (the count alone was the same for two shards of rank 0's, half
    the split unseen), and the epoch's train loss and accuracy are those of both processes'
    steps together."""
    out, records = tmp_path / "dist", tmp_path / "epochs"
    recorder = tmp_path / "record_epochs.py"
    recorder.write_text(EPOCHS_RECORDED)
    n_train, n_test = 601, 201  # odd sizes: one padding sample, unequal test shards
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "0",  # a free port: 29500, its default, may be another test's
         str(recorder), str(records), *TRAIN[1:], *SMALL, "--synthetic-size", str(n_train),
         str(n_test), "--data-dir", str(data_dir), "--epochs", "1", "--loader", "resident",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=launcher_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared by the two
    assert f" x2, {threads} thread{'s' * (threads != 1)} each: resident loader" in result.stdout
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["processes"] == 2
    row = ckpt["history"][0]
    assert row["train_images"] == n_train + 1  # every sample once, plus the explicit padding
    lines = [Path(f"{records}.{rank}").read_text().splitlines() for rank in (0, 1)]
    (shard_0, sums_0), (shard_1, sums_1) = ([list(map(float, line.split())) for line in rank]
                                            for rank in lines)
    seen = torch.bincount(torch.tensor(shard_0 + shard_1, dtype=torch.long), minlength=n_train)
    assert len(shard_0) == len(shard_1) and seen.min() == 1 and seen.sum() == n_train + 1
    loss, correct, images = (a + b for a, b in zip(sums_0, sums_1, strict=True))
    assert images == n_train + 1
    assert (row["train_loss"], row["train_acc"]) == pytest.approx((loss / images,
                                                                   correct / images), rel=1e-5)
    assert row["test_images"] == n_test  # evaluated once each, across both shards
    assert result.stdout.count("best test accuracy") == 1  # only the main process prints
    assert_reported_accuracy_matches(ckpt)


def test_accelerate_launch_neither_compiles_nor_narrows_a_cpu_run_behind_its_back(data_dir,
                                                                                   tmp_path):
    """`accelerate launch` sets OMP_NUM_THREADS=1 (without --cpu), which left a one-process
    CPU run on one core; its --dynamo_backend compiled the model of a run whose header and
    config.json said eager, and its --mixed_precision went unused without a word."""
    out, cache = tmp_path / "run", tmp_path / "inductor"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "inductor",
         *TRAIN[1:], *SMALL, "--synthetic-size", "300", "100", "--data-dir", str(data_dir),
         "--epochs", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**launcher_env(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f" x1, {cores} thread{'s' * (cores != 1)} each: ffcv loader, fp32, eager" \
        in result.stdout
    assert ("notice: accelerate launch's --mixed_precision bf16 and --dynamo_backend INDUCTOR "
            "are not used") in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["precision"], config["compile"]) == ("fp32", False)
    assert not any(cache.rglob("*"))  # inductor writes its cache as soon as it compiles


def stopped_mid_run(data_dir: Path, tmp_path: Path, epochs: int,
                    stop: Callable[[int], None]) -> tuple[subprocess.Popen, str, Path]:
    """A two-process resident run under torchrun, stop(torchrun's pid) called once it saved
    its first epoch: the finished process, its stderr and the run folder."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *TRAIN[1:],
         *SMALL, *SHARED_SPLIT, "--data-dir", str(data_dir), "--epochs",
         str(epochs), "--loader", "resident", "--out", str(out)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=torchrun_env(tmp_path))
    try:
        wait_until((out / "metrics.jsonl").exists, 300, "no epoch was saved", process=proc)
        stop(proc.pid)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc, stderr, out


# engine/train.py, its first process started late (a loaded machine's scheduling)
FIRST_STARTS_LATE = """
import os, runpy, sys, time
if os.environ["LOCAL_RANK"] == "0":
    time.sleep(1)
sys.argv[0] = sys.argv.pop(1)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_refused_option_under_torchrun_is_said_once(tmp_path):
    """Every process reads the same options, so each printed the same usage error: eight lines
    for eight GPUs, above torchrun's summary. The first process of the machine says it, even
    when it starts late: torchrun ended it as soon as another one had exited."""
    late = tmp_path / "late.py"
    late.write_text(FIRST_STARTS_LATE)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(late),
         *TRAIN[1:], *SMALL, "--epochs", "0", "--out", str(tmp_path / "run")], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env=torchrun_env(tmp_path))
    assert result.returncode != 0
    assert result.stderr.count("error: --epochs must be at least 1; see --help") == 1, (
        result.stderr)
    assert "exitcode  : 2" in result.stderr  # each process still exits as refused
    assert not (tmp_path / "run").exists()


def test_ctrl_c_on_several_processes_says_once_what_was_kept(data_dir, tmp_path):
    """A terminal's Ctrl-C reaches every process of the run. Each said what ckpt.pt held as
    it saw it, where only the main process waits for its writer: the lines could disagree.
    Now the main process says it, the others that they stopped. (torchrun's own traceback for
    the signal it got is its own.)"""
    # the whole group, as a terminal sends it
    _, stderr, out = stopped_mid_run(data_dir, tmp_path, 20,
                                     lambda pid: os.killpg(pid, signal.SIGINT))
    lines = sorted(line for line in stderr.splitlines() if line.startswith("interrupted: "))
    assert len(lines) == 2, stderr[-3000:]
    assert re.fullmatch(rf"interrupted: {re.escape(str(out))}/ckpt.pt holds epoch \d+; "
                        rf"continue with --resume {re.escape(str(out))}", lines[0]), lines
    assert lines[1] == "interrupted: process 1 of 2 stopped; process 0 says what was kept"


def test_a_process_that_fails_stops_the_others_with_one_line_each(tmp_path):
    # the main process fails preparing the data (a CIFAR folder without its files); the other
    # one, waiting for it at a barrier, ended in gloo's "Connection closed by peer" traceback
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *TRAIN[1:],
         *SMALL, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out",
         str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=torchrun_env(tmp_path))
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]
    assert "batches.meta is missing" in errors[0]
    assert errors[1].startswith("error: process 1 of 2 stops: most often another process of "
                                "this run stopped first, and its own message says why (here a "
                                "collective failed: RuntimeError: ")
    assert errors[1].endswith(").")  # what was kept is the main process's to say, not its own
    # torchrun's own report of a failed process is its one traceback
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr


def test_torchrun_restarts_of_several_cpu_processes_are_refused_before_they_hang(data_dir,
                                                                                 tmp_path):
    """torchrun --max-restarts starts every process again after one fails: started again, two
    CPU processes waited in gloo's rendezvous (minutes, until stopped) or failed there with a
    traceback, as a plain script's do; and a new run's restart finds its own run in --out."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--max-restarts", "1", *TRAIN[1:], *SMALL, "--synthetic-size", "300", "100",
         "--data-dir", str(data_dir), "--epochs", "1", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=torchrun_env(tmp_path))
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert result.returncode != 0 and errors == {
        "error: torchrun --max-restarts 1 would start this run's processes again after a "
        "failure, and several CPU processes started again wait in gloo's rendezvous, or fail "
        "there, instead of training (the restart of a new run would also find its own run in "
        "--out); leave --max-restarts (accelerate launch: --max_restarts) out, and continue a "
        f"stopped run with --resume {out}."}, result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1 and not out.exists()  # torchrun's own


def rank_of(torchrun: int, rank: int) -> int:
    """The pid of the process of `rank` that torchrun (pid `torchrun`) started."""
    for child in Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"torchrun {torchrun} has no process of rank {rank}")


def test_a_process_killed_alone_leaves_the_main_one_saying_what_was_kept(data_dir, tmp_path):
    """kill -9 of one process (the OOM killer's way) mid-run: the main process said only that
    another process stopped first, and the killed one says nothing, so no line said that
    ckpt.pt holds the last epoch and how to go on."""
    proc, stderr, out = stopped_mid_run(data_dir, tmp_path, 30,
                                        lambda pid: os.kill(rank_of(pid, 1), signal.SIGKILL))
    assert proc.returncode != 0
    done = len(read_history(out))
    assert 0 < done < 30, stderr[-3000:]
    # its error, or its Ctrl-C line where torchrun's SIGTERM to it comes first
    said = [line for line in stderr.splitlines() if line.startswith(("error: process 0 of 2",
                                                                     "interrupted: "))]
    assert len(said) == 1, stderr[-3000:]
    assert said[0].endswith(f"{out}/ckpt.pt holds epoch {done}; continue with --resume {out}"
                            + "." * said[0].startswith("error")), said


def test_torchrun_killed_outright_stops_its_processes_with_every_finished_epoch(data_dir,
                                                                                tmp_path):
    """kill -9 of torchrun itself (the OOM killer's way, a scheduler's hard stop) handed its
    processes nothing: each in a session of its own, they trained on unseen, holding the
    run's folder. Now each gets a SIGTERM as torchrun dies and stops as on torchrun's own."""
    workers: list[int] = []

    def kill_torchrun(pid: int) -> None:
        workers.extend(rank_of(pid, rank) for rank in (0, 1))
        os.kill(pid, signal.SIGKILL)

    try:
        _, stderr, out = stopped_mid_run(data_dir, tmp_path, 30, kill_torchrun)
    finally:  # a failed test leaves no process training
        for pid in workers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    done = len(read_history(out))
    assert 0 < done < 30, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert f"interrupted: {out}/ckpt.pt holds epoch {done}; continue with --resume {out}" in \
        said, stderr[-3000:]
    assert checkpoint.load(out / "ckpt.pt")["epoch"] == done and not (out / ".lock").exists()


def test_resume_after_ctrl_c_gives_the_uninterrupted_history(data_dir, tmp_path):
    # three runs of an uninterrupted, a cut and a resumed history on SHARED_SPLIT (its last
    # batch short), epochs of any size compared
    common = [*SHARED_SPLIT, "--data-dir", str(data_dir), "--epochs", "3",
              "--loader", "resident"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).returncode == 0

    cut = tmp_path / "cut"
    returncode, stderr = interrupt_after_first_epoch([*SMALL, *common], cut)
    # stopped mid-run: a clean exit that names --resume
    assert returncode == 130 and f"--resume {cut}" in stderr, stderr[-3000:]
    assert "ckpt.pt holds epoch 1;" in stderr
    assert checkpoint.load(cut / "ckpt.pt")["epoch"] == len(read_history(cut)) == 1

    resumed = train("--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_images")
    for a, b in zip(read_history(full), read_history(cut), strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_a_reader_of_the_output_gone_stops_the_run_saying_what_was_kept(data_dir, tmp_path):
    """`engine/train.py | head -1`: the run stops at its next line, as a Ctrl-C stops it, and
    the line saying so names the epoch ckpt.pt holds and the --resume to go on with (it said
    only to keep the reader running)."""
    out = tmp_path / "run"
    line, code, stderr = with_head("engine/train.py", *SMALL, *SHARED_SPLIT, "--data-dir",
                                   data_dir, "--epochs", 3, "--out", out)
    assert line.startswith("synthetic on cpu") and code == 1, stderr[-3000:]
    held = checkpoint.load(out / "ckpt.pt")["epoch"]
    assert held < 3 and stderr.endswith(
        "keep its reader running. "
        f"{out}/ckpt.pt holds epoch {held}; continue with --resume {out}.\n"), stderr[-3000:]


# python -c this script args: engine/train.py, with a real Ctrl-C as soon as best.pt is saved,
# before the epoch's ckpt.pt, metrics and config.json
CTRL_C_AFTER_BEST = """
import os, runpy, signal, sys
from engine import checkpoint
signal.signal(signal.SIGINT, signal.default_int_handler)  # a command typed at a terminal
save = checkpoint.torch_save
def save_then_interrupt(tmp, content):
    save(tmp, content)
    if tmp.name.startswith(".best.pt."):
        os.kill(os.getpid(), signal.SIGINT)
checkpoint.torch_save = save_then_interrupt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_while_an_epoch_is_saved_waits_for_all_its_files(data_dir, tmp_path):
    """best.pt, ckpt.pt, metrics and config.json are one epoch's files: a Ctrl-C between them
    left best.pt an epoch ahead of ckpt.pt (or, in the first epoch, no run at all). The
    resident loader: FFCV's JIT would add seconds to a test of the saving."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_BEST, str(ROOT / "engine/train.py"),
                             *SMALL, *SHARED_SPLIT, "--loader", "resident",
                             "--data-dir", str(data_dir), "--epochs", "3", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 130, result.stderr[-3000:]
    assert f"ckpt.pt holds epoch 1; continue with --resume {out}" in result.stderr
    assert [checkpoint.load(out / name)["epoch"] for name in ("best.pt", "ckpt.pt")] == [1, 1]
    assert len(read_history(out)) == 1
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


# python -c this script records args: engine/train.py, each ckpt.pt write held until the main
# thread has made its epoch's line, which comes after the write is handed over (a write that the
# epoch waited for would never see the line, and say so after a minute); a line per write in
# `records`, not on stdout, where the main thread's print could split it
WRITES_BESIDE_TRAINING = """
import runpy, sys, threading
from engine import checkpoint, loop
records = open(sys.argv[1], "a", buffering=1)
made = threading.Event()
line = loop.summary_line
def note_the_line(row, epochs):
    made.set()
    return line(row, epochs)
loop.summary_line = note_the_line
save = checkpoint.torch_save
def save_after_the_line(tmp, content):
    if not tmp.name.startswith(".ckpt.pt."):
        return save(tmp, content)
    went_on = made.wait(timeout=60)
    made.clear()
    save(tmp, content)
    records.write(f"ckpt.pt of epoch {content['epoch']} written on "
                  f"{threading.current_thread().name}: training went on {went_on}\\n")
checkpoint.torch_save = save_after_the_line
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    records.write("the command returned\\n")
"""


def test_each_epoch_is_written_in_the_background_and_the_last_before_the_end(data_dir, tmp_path):
    """Training goes on while an epoch's files are written (a GPU would otherwise wait for the
    disk), and the command returns only once the last epoch's files are whole. The resident
    loader: FFCV's JIT would add seconds to a test of the writing."""
    out, records = tmp_path / "run", tmp_path / "records.txt"
    result = subprocess.run([sys.executable, "-c", WRITES_BESIDE_TRAINING, str(records),
                             str(ROOT / "engine/train.py"), *SMALL, *SHARED_SPLIT,
                             "--loader", "resident", "--data-dir", str(data_dir),
                             "--epochs", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records.read_text().splitlines() == [
        *(f"ckpt.pt of epoch {n} written on epoch-writer_0: training went on True"
          for n in (1, 2)), "the command returned"], result.stdout
    assert checkpoint.load(out / "ckpt.pt")["epoch"] == 2 and len(read_history(out)) == 2


@pytest.mark.parametrize("content", [b"", b"not a zip", "foreign", "truncated"])
def test_resume_rejects_foreign_or_corrupt_checkpoints(two_epoch_run, tmp_path, capsys, content):
    """One message naming the file, exit 1, nothing written: the truncated file as a real
    process, the others through main() (checkpoint.load's own refusals are test_reliability's)."""
    run = tmp_path / "run"
    run.mkdir()
    if content == "foreign":
        torch.save({"model": torch.zeros(3)}, run / "ckpt.pt")
    elif content == "truncated":
        blob = (two_epoch_run / "ckpt.pt").read_bytes()
        (run / "ckpt.pt").write_bytes(blob[: len(blob) // 2])
    else:
        (run / "ckpt.pt").write_bytes(content)
    result = (train("--resume", run, timeout=120) if content == "truncated" else
              in_process(capsys, train_command.main, *SMALL, "--resume", run))
    assert result.returncode == 1
    assert str(run / "ckpt.pt") in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt"]  # nothing else written


def test_more_workers_than_cores_are_refused_before_the_data_is_made(tmp_path):
    """With any loader: the resident one trained with them (it has no workers, but writes
    the .beton files with them), the others refused them after the data was written."""
    cores = len(os.sched_getaffinity(0))  # the child's, which inherits this process's cores
    result = train("--workers", cores + 1, "--loader", "resident", "--out", tmp_path / "out",
                   "--data-dir", tmp_path / "data", timeout=120)
    assert result.returncode == 2 and (f"--workers {cores + 1}: this process may use {cores} "
                                       f"core{'s' * (cores != 1)}; pass --workers {cores}"
                                       ) in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_fp16_without_a_gpu_is_refused(tmp_path):
    result = train("--precision", "fp16", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 1 and "fp16 needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_data_dir_without_data_names_the_file(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # used as is: no download is attempted
    result = subprocess.run([*TRAIN, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                             "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(tmp_path / "cifar-10-batches-py" / "batches.meta") in result.stderr
    assert not list(tmp_path.glob("*.beton")) and not (tmp_path / "out").exists()


def test_divergence_on_several_processes_is_said_once(data_dir, tmp_path):
    """Every process finds a divergence at once (from the sums they share), and each printed
    the same paragraph; now the main process says it, each other one that it stopped too."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *TRAIN[1:],
         *SMALL, *SHARED_SPLIT, "--data-dir", str(data_dir), "--epochs",
         "1", "--loader", "resident", "--lr", "1e8", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=torchrun_env(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]
    stopped = "error: process 1 of 2 stops with process 0, which says why and what to run next"
    assert stopped in errors, errors
    said = errors[1 - errors.index(stopped)]
    assert "became NaN or infinite in epoch 1" in said and "--lr" in said, said
    assert not (out / "ckpt.pt").exists()


def test_tensorboard_tracker_logs_the_epoch_metrics(tmp_path, data_dir):
    out = tmp_path / "out"
    result = train("--synthetic-size", "300", "100", "--data-dir", str(data_dir), "--epochs",
                   "1", "--loader", "resident", "--log-with", "tensorboard", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # where docs/training.md says: DIR/cifar10-engine/
    events = EventAccumulator(str(next((out / "cifar10-engine").rglob(
        "events.out.tfevents.*")).parent)).Reload()
    assert {"test_acc", "train_loss", "lr"} <= set(events.Tags()["scalars"])
    # at the epoch's number, as metrics.csv counts them (a resumed run's go on from its own)
    assert [event.step for event in events.Scalars("test_acc")] == [1]
    # the run's config as hparams, its numbers as numbers (tensorboard filters and sorts them)
    import yaml

    hparams = yaml.safe_load(next((out / "cifar10-engine").rglob("hparams.yml")).read_text())
    assert (hparams["epochs"], hparams["width"], hparams["tta"]) == (1, 8, True), hparams
    assert isinstance(hparams["lr"], float) and hparams["data_dir"] == str(data_dir)


def test_a_ctrl_c_before_the_first_epoch_leaves_no_tracker_logs(tmp_path, data_dir):
    """'nothing was saved', and nothing is: the trackers' folder of a run stopped before its
    first epoch was left, and with it the run folder."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "engine" / "train.py"), "--dataset", "synthetic",
         "--synthetic-size", "6000", "100", "--width", "16", "--data-dir", str(data_dir),
         "--epochs", "3", "--loader", "resident", "--log-with", "tensorboard", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # strict: a Ctrl-C sent before the trackers' folder was made would test nothing of it
    wait_until((out / "cifar10-engine").exists, 300, "the trackers' folder never appeared", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().endswith("no epoch had finished, so nothing was saved; run the same "
                                   "command again")
    assert not out.exists()


def test_a_tracker_into_an_out_named_in_no_utf8_is_refused_before_any_work(tmp_path):
    """tensorboard encodes its folder as UTF-8: a UnicodeEncodeError traceback, then an
    AttributeError one from accelerate's tracker.finish(), and exit 1."""
    out = tmp_path / os.fsdecode(b"run-\xff")
    result = train("--data-dir", str(tmp_path / "data"), "--log-with", "tensorboard", "--out",
                   str(out), errors="surrogateescape")
    assert result.returncode == 1 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr == (f"error: --log-with tensorboard: the trackers name their files in "
                             f"UTF-8, and --out {tmp_path}/run-? holds bytes that are not UTF-8 "
                             "(shown as ?); choose an --out named in UTF-8, or leave --log-with "
                             "out.\n")
    assert list(tmp_path.iterdir()) == []  # no data prepared, no run folder


def test_an_out_named_in_no_utf8_trains_where_no_tracker_writes(tmp_path):
    """Only the trackers need their folder in UTF-8: without --log-with, an --out named in
    other bytes (a Latin-1 name on an old disk) trains and saves as any other (the resident
    loader: the name is no loader's concern, and FFCV's JIT takes seconds)."""
    out = tmp_path / os.fsdecode(b"run-\xff")
    result = train("--synthetic-size", "200", "50", "--loader", "resident", "--data-dir",
                   str(tmp_path / "data"), "--epochs", "1", "--out", str(out),
                   errors="surrogateescape")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "ckpt.pt").is_file() and (out / "best.pt").is_file()


def test_a_tracker_logs_a_run_whose_data_dir_is_named_in_no_utf8(tmp_path):
    """config.json's values go to the trackers too: tensorboard's hparams refused the
    --data-dir's undecodable bytes (a UnicodeEncodeError traceback); they go as '?'."""
    data = tmp_path / os.fsdecode(b"data-\xff")
    result = train("--synthetic-size", "200", "50", "--data-dir", str(data), "--epochs", "1",
                   "--width", "8", "--log-with", "tensorboard", "--out", str(tmp_path / "out"),
                   errors="surrogateescape")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    import yaml

    hparams = yaml.safe_load(next((tmp_path / "out" / "cifar10-engine").rglob("hparams.yml"))
                             .read_text())
    assert hparams["data_dir"] == f"{tmp_path}/data-?", hparams  # not left out


def test_an_unknown_tracker_is_a_usage_error_before_any_work(tmp_path):
    result = train("--log-with", "no-such-tracker", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and "invalid choice: 'no-such-tracker'" in result.stderr
    assert "tensorboard" in result.stderr  # the choices, as accelerate names them
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_whose_package_is_missing_says_what_to_install(tmp_path, data_dir):
    result = train("--synthetic-size", "200", "50", "--data-dir", str(data_dir), "--epochs", "1",
                   "--width", "8", "--log-with", "wandb", "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stdout == "" and not (tmp_path / "out").exists()
    assert result.stderr == ("error: --log-with wandb: its package is not installed; pip "
                             "install wandb, or leave --log-with out.\n")  # no warning first


def test_log_with_all_takes_the_trackers_installed():
    """accelerate's 'all' is every tracker that is installed: with tensorboard installed (a
    test dependency), it is no error."""
    from accelerate.tracking import get_available_trackers

    assert "tensorboard" in [tracker.value for tracker in get_available_trackers()]
    engine.trackers.check_tracker("all")


def test_log_with_all_and_no_tracker_installed_says_to_install_one(monkeypatch):
    """accelerate's 'all' is every tracker that is installed: with none, one message."""
    monkeypatch.setattr(engine.trackers, "get_available_trackers", lambda: [])  # a bare install
    with pytest.raises(TrainingError) as refused:
        engine.trackers.check_tracker("all")
    assert str(refused.value) == ("--log-with all: no tracker's package is installed; pip "
                                  "install one (e.g. tensorboard), or leave --log-with out.")
    engine.trackers.check_tracker(None)  # no tracker asked for: nothing to check

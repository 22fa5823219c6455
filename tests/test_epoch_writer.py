"""engine.epoch_writer: an epoch's files written on a thread, one write at a time, its errors
raised in the training thread, the last write finished however the run ends."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import small_run

from common.errors import CheckpointError
from engine import checkpoint
from engine.epoch_writer import EpochWriter
from engine.run import train_step


def test_submit_returns_while_the_write_goes_on_in_another_thread():
    """The point of it: the next epoch trains while this one's files are written. The write
    waits for the caller to go on; a submit that blocked until the write ended would make it
    time out instead."""
    went_on, seen = threading.Event(), {}

    def write() -> None:
        seen["went_on"] = went_on.wait(timeout=60)
        seen["thread"] = threading.current_thread()

    with EpochWriter() as writer:
        writer.submit(write)
        went_on.set()
    assert seen["went_on"] and seen["thread"] is not threading.main_thread()


def test_writes_run_one_at_a_time_in_the_order_submitted():
    spans: list[tuple[int, float, float]] = []

    def write(epoch: int) -> None:
        start = time.perf_counter()
        time.sleep(0.05)  # long enough that a second writer thread would overlap it
        spans.append((epoch, start, time.perf_counter()))

    with EpochWriter() as writer:
        for epoch in range(4):
            writer.submit(lambda epoch=epoch: write(epoch))
    assert [epoch for epoch, _, _ in spans] == [0, 1, 2, 3]
    assert all(after[1] >= before[2] for before, after in zip(spans, spans[1:], strict=False))


def test_a_failed_write_is_raised_by_the_next_submit_which_writes_nothing():
    """Also a write still running when the next submit comes: submit waits for it, raises its
    error and writes nothing (a wait that returned while it ran lost the error, and wrote on)."""
    written = []

    def fail() -> None:
        time.sleep(0.2)  # still being written as the next submit comes
        raise CheckpointError("could not write ckpt.pt (disk full)")

    with EpochWriter() as writer:
        writer.submit(fail)
        with pytest.raises(CheckpointError, match="disk full"):
            writer.submit(lambda: written.append(2))
        writer.wait()  # the error was raised once, and nothing is left to wait for
    assert written == []


def test_check_raises_a_failed_write_and_returns_at_once_while_one_runs():
    """check() is called before every training step: it must never wait for a write."""
    release = threading.Event()

    def fail() -> None:
        release.wait(timeout=60)
        raise CheckpointError("could not write ckpt.pt (disk full)")

    with EpochWriter() as writer:
        writer.submit(fail)
        writer.check()  # still running: nothing to raise, and no wait
        release.set()
        with pytest.raises(CheckpointError, match="disk full"):
            for _ in range(600):  # until the write has failed, 60 s at most
                writer.check()
                time.sleep(0.1)
        writer.check()  # raised once


def test_a_failed_last_write_is_raised_when_the_block_ends():
    def fail() -> None:
        raise OSError(28, "No space left on device", "runs/a/metrics.csv")

    with pytest.raises(OSError, match="metrics.csv"), EpochWriter() as writer:
        writer.submit(fail)


def test_an_interrupt_leaves_the_block_only_once_the_write_in_flight_is_done(tmp_path: Path):
    """A Ctrl-C in the training thread while an epoch's files are written: the files are
    finished before the interrupt goes on to say which epoch ckpt.pt holds."""
    started, done = threading.Event(), tmp_path / "done"

    def write() -> None:
        started.set()
        time.sleep(0.3)
        done.write_text("epoch 1")

    with pytest.raises(KeyboardInterrupt), EpochWriter() as writer:
        writer.submit(write)
        started.wait(timeout=60)
        raise KeyboardInterrupt
    assert done.read_text() == "epoch 1"


def test_ctrl_cs_while_the_block_ends_wait_for_the_write_in_flight(tmp_path: Path) -> None:
    """Two Ctrl-Cs while leaving the block waits for the last write (one as it waits for the
    write, one as it waits for the writer's thread): the interrupt comes once the files are
    whole. Let through, the second cut the wait for the thread short, and the interrupt came
    while the write went on."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C
    done = tmp_path / "done"

    def write() -> None:
        for _ in range(2):
            time.sleep(0.2)  # the main thread meanwhile waits in the block's end
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        done.write_text("epoch 1")

    try:
        with pytest.raises(KeyboardInterrupt), EpochWriter() as writer:
            writer.submit(write)
        assert done.read_text() == "epoch 1"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_state_handed_to_the_writer_is_a_copy_training_cannot_change(prepared, tmp_path):
    """On the CPU, .cpu() hands back the very tensors the next step updates in place: the
    checkpoint written during that step would mix two epochs' weights and moments."""
    run = small_run(prepared, tmp_path)
    batches = iter(run.train_loader)
    train_step(run, *next(batches))  # the optimizer has moments now
    history = [dict(epoch=1)]
    ckpt = checkpoint.content(run, history)
    weights = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    moments = [s["momentum_buffer"].clone()
               for s in ckpt["resume"]["optimizer"]["state"].values()]
    assert moments  # the optimizer's state is in the checkpoint
    train_step(run, *next(batches))
    history.append(dict(epoch=2))
    live = run.unwrapped.state_dict()
    assert not torch.equal(live["fc.weight"], weights["fc.weight"])  # the step changed it
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in weights.items())
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in
               zip(ckpt["resume"]["optimizer"]["state"].values(), moments, strict=True))
    assert ckpt["history"] == [dict(epoch=1)] and ckpt["epoch"] == 1


def test_a_stop_signal_as_the_first_write_starts_still_waits_for_that_write(tmp_path):
    """The first submit starts the writer's thread, which may run the write before submit
    returns: a Ctrl-C then (sent here by the write itself) left the block without waiting for
    the write, whose thread the pool did not yet hold to join. Training then said that nothing
    was saved, and removed best.pt, while ckpt.pt was still being written."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C
    done = tmp_path / "done"

    def write() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the main thread meanwhile gets its KeyboardInterrupt
        done.write_text("")

    try:
        with pytest.raises(KeyboardInterrupt), EpochWriter() as writer:
            writer.submit(write)
            time.sleep(60)  # cut short by the interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done.exists()

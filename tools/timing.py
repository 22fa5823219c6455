"""Timing primitives of tools/bench.py: epochs of a loader or of training, blocks of steps
and of matmuls, each waited for on the device so host clocks measure the work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Protocol, TypeVar

import torch

from common.errors import one_line
from common.stop_signals import stop_if_interrupted
from engine.run import DTYPES, Run, train_step
from tools.bench_options import TURN_EPOCHS, TURN_S


@dataclass
class Pass:
    """One timed epoch: images seen, wall seconds, and seconds blocked waiting for a batch."""

    images: int
    seconds: float
    wait_s: float = 0.0
    first_wait_s: float = 0.0  # of wait_s, for the first batch: the epoch's start-up


@dataclass
class Peak:
    """A dense matmul FLOP/s measurement: the denominator of MFU."""

    dtype: str
    size: int  # n of the n x n x n matmul
    reps: int  # per timed block
    block_s: list[float]
    flops_per_s: float  # of the fastest block
    math: str  # the arithmetic the product ran in: the dtype, or tf32 for fp32 on tensor cores


class EpochLoader(Protocol):
    """What loader_pass times: one of ours (loaders.base.BatchLoader) or a peer's behind
    tools.bench_peers.Timed, iterated for an epoch's (images, labels) batches."""

    device: torch.device

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_pass(loader: EpochLoader, epoch: int,
                on_first: Callable[[torch.Tensor], object] | None = None) -> Pass:
    """Iterate one epoch of a loader, as a consumer that keeps every batch would; on_first sees
    the first batch's images (to describe a loader's output without starting an extra epoch)."""
    loader.set_epoch(epoch)
    sync(loader.device)
    start, images = time.perf_counter(), 0
    try:
        for batch, labels in loader:
            if on_first is not None and not images:
                on_first(batch)
            images += len(labels)
    finally:
        # a stop signal that Python dropped during the pass (in a finalizer or an at-fork
        # hook) stops here, and so does the error it caused meanwhile (a torchvision worker
        # the same signal killed): the sections record an error and go on, and the loaders'
        # turns, as many as --epochs, logged nothing that would have stopped them
        stop_if_interrupted()
    sync(loader.device)
    return Pass(images, time.perf_counter() - start)


def loader_turn(loader: EpochLoader, epoch: int) -> list[Pass]:
    """A loader's turn where loaders take turns: epochs `epoch`, `epoch + 1`, ... until they
    fill TURN_S, at most TURN_EPOCHS of them, so that an epoch of milliseconds (a GPU's) is
    timed dozens of times a turn rather than once, and a slow one still once."""
    passes = [loader_pass(loader, epoch)]
    while sum(p.seconds for p in passes) < TURN_S and len(passes) < TURN_EPOCHS:
        passes.append(loader_pass(loader, epoch + len(passes)))
    return passes


class TurnRow(Protocol):
    """A loaders table's row that take_turns fills (bench_sections.LoaderResult,
    bench_peers.PeerResult)."""

    status: str
    reason: str
    images: int | None
    first_epoch_s: float | None
    epoch_s: list[float] | None
    images_per_s: float | None


Row = TypeVar("Row", bound=TurnRow)


def take_turns(entrants: list[tuple[Row, EpochLoader]], turns: int,
               errors: tuple[type[Exception], ...],
               on_first: Callable[[Row, torch.Tensor], object] = lambda row, images: None,
               after_turn: Callable[[], object] = lambda: None) -> list[tuple[Row, EpochLoader]]:
    """A warm-up epoch of each loader, then `turns` turns (loader_turn) in which they take
    their steady-state epochs one after the other, so that a burst of load on a shared machine
    hits all of them alike. Each row gets its warm-up's images and seconds, and after each turn
    its steady epochs and the images/s of the fastest; `on_first` sees a row's first batch,
    `after_turn` runs after each turn. A loader raising one of `errors` marks its row failed,
    its steady figures as they were before its turns, and takes no more turns. The entrants
    that ran every epoch."""
    running, steady, unfilled = [], {}, {}
    for row, loader in entrants:
        try:
            first = loader_pass(loader, 0, on_first=lambda images, row=row: on_first(row, images))
        except errors as error:
            row.status, row.reason = "failed", one_line(error)
            continue
        row.images, row.first_epoch_s = first.images, first.seconds
        running.append((row, loader))
        steady[id(row)], unfilled[id(row)] = [], row.epoch_s
    for _ in range(turns):
        for row, loader in list(running):
            passes = steady[id(row)]
            try:  # each epoch its own number after the warm-up's 0, so its own augmentations
                passes += loader_turn(loader, len(passes) + 1)
            except errors as error:
                row.status, row.reason = "failed", one_line(error)
                # no steady figure of a loader that failed
                row.epoch_s, row.images_per_s = unfilled[id(row)], None
                running.remove((row, loader))
        for row, _ in running:
            best = fastest(steady[id(row)])
            row.epoch_s = [p.seconds for p in steady[id(row)]]
            row.images_per_s = best.images / best.seconds
        after_turn()
    return running


def train_pass(run: Run, epoch: int) -> Pass:
    """One epoch of engine.run.train_step over the run's loader, timing the waits in next()
    (the first apart: an epoch's start, such as FFCV's new pipeline thread)."""
    loader, device = run.train_loader, run.accelerator.device
    loader.set_epoch(epoch)
    run.model.train()
    sync(device)
    start, images, waits, batches = time.perf_counter(), 0, [], iter(loader)
    try:
        while True:
            before = time.perf_counter()
            batch = next(batches, None)
            waits.append(time.perf_counter() - before)
            if batch is None:
                break
            train_step(run, *batch)
            images += len(batch[1])
    finally:
        stop_if_interrupted()  # as in loader_pass
    sync(device)
    return Pass(images, time.perf_counter() - start, sum(waits), waits[0])


def timed_steps(run: Run, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    """Seconds for n training steps on the next n batches (itertools.repeat of one batch
    already on the device: the step alone), device synchronized."""
    device = run.accelerator.device
    sync(device)
    start = time.perf_counter()
    for images, labels in islice(batches, n):
        train_step(run, images, labels)
    sync(device)
    return time.perf_counter() - start


def timed_epoch_steps(run: Run, images: torch.Tensor, labels: torch.Tensor, total: int) -> float:
    """Seconds to train `total` images in the steps an epoch takes, on one batch already on
    the device: its full batches, then its partial last one (which runs eager, not compiled:
    engine.run.build), so a loader is not charged for that batch's own cost."""
    full, rest = divmod(total, len(labels))
    return timed_steps(run, repeat((images, labels)), full) + (
        timed_steps(run, [(images[:rest], labels[:rest])], 1) if rest else 0.0)


def fastest(passes: list[Pass]) -> Pass:
    """The pass least disturbed by other work on the machine."""
    return min(passes, key=lambda p: p.seconds / p.images)


def timed_matmuls(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Seconds for reps products a @ b."""
    sync(a.device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync(a.device)
    return time.perf_counter() - start


@contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """CUDA fp32 matmuls on TF32 tensor cores (or not) inside the block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_peak(dtype: str, device: torch.device, n: int, seconds: float, blocks: int) -> Peak:
    """Dense matmul FLOP/s of n x n x n products of `dtype`: the fastest of timed blocks.

    On CUDA, fp32 convolutions run in TF32 where cuDNN allows it (its default), so the fp32
    peak is then a TF32 matmul's: an IEEE fp32 one would overstate the fp32 step's MFU.
    """
    tf32 = dtype == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    with matmul_tf32(tf32):
        timed_matmuls(a, b, 1)  # warm-up: library load, kernel choice
        reps = max(3, int(seconds / blocks / timed_matmuls(a, b, 1)))
        block_s = [timed_matmuls(a, b, reps) for _ in range(blocks)]
    return Peak(dtype, n, reps, block_s, 2 * n**3 * reps / min(block_s),
                "tf32" if tf32 else dtype)


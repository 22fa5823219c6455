"""The sections of tools/bench.py: loaders alone, the training step and full epochs (MFU:
bench_mfu.py). Each returns result dataclasses; their fields are the columns of the printed
tables."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import repeat
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Any

import torch

from common.errors import TrainingError, one_line
from common.stop_signals import STOP_SIGNALS, signal_at_parent_death
from common.streams import Log, silent
from engine.config import TrainConfig
from engine.run import prepare_data
from loaders import LOADERS
from loaders.base import BatchLoader
from tools.bench_names import epoch_name, overhead_text, step_name
from tools.bench_setup import (
    MEASURE_ERRORS,
    build_loader,
    make_run,
    pin_threads,
    release,
)
from tools.timing import fastest, sync, take_turns, timed_epoch_steps, timed_steps, train_pass


@dataclass
class LoaderResult:
    """Throughput of one loader alone: batches made and handed over, no model."""

    loader: str
    batch_size: int
    status: str = "ok"  # "failed": see reason (the other loaders are measured all the same)
    reason: str = ""
    images: int | None = None  # per epoch
    construct_s: float | None = None  # building the loader object
    first_epoch_s: float | None = None  # warm-up epoch: worker start-up, numba JIT, page cache
    epoch_s: list[float] = field(default_factory=list)  # steady-state epochs after the warm-up
    images_per_s: float | None = None  # of the fastest steady-state epoch
    vs_torchvision: float | None = None  # images_per_s over the torchvision loader's


@dataclass
class StepResult:
    """Throughput of the engine's training step in one configuration, data already on device."""

    precision: str
    memory_format: str
    compile: bool
    batch_size: int
    width: int
    compile_mode: str = "default"
    status: str = "ok"  # "skipped" (the engine refuses it here) or "failed": see reason
    reason: str = ""
    warmup_s: float | None = None  # the untimed warm-up steps, torch.compile included
    steps: int | None = None  # per timed block
    block_s: list[float] | None = None  # seconds of each timed block of `steps` steps
    images_per_s: float | None = None  # of the fastest block


@dataclass
class EpochResult:
    """Full training epochs (data + step) with one loader, and the share spent waiting for data."""

    loader: str
    precision: str
    compile: bool
    batch_size: int
    width: int
    compile_mode: str = "default"
    cudnn_benchmark: bool = True  # cuDNN's autotuning (TrainConfig.autotunes)
    status: str = "ok"  # "failed": see reason (the other loaders' epochs run all the same)
    reason: str = ""
    images: int | None = None  # per epoch
    build_s: float | None = None  # engine.run.build: data, loaders, model, optimizer
    first_epoch_s: float | None = None  # warm-up epoch: JIT, torch.compile, worker start-up
    epoch_s: list[float] = field(default_factory=list)  # steady-state epochs
    data_wait_s: list[float] = field(default_factory=list)  # blocked in next(), per epoch
    first_batch_wait_s: list[float] = field(default_factory=list)  # of it, for the first batch
    data_wait_share: float | None = None  # of the fastest steady-state epoch: wait / epoch
    images_per_s: float | None = None  # of the fastest steady-state epoch
    # the same images as steps on one batch already on the device, and the share of the
    # fastest epoch that the loader adds to them: the data cost wherever the host blocks
    step_only_s: float | None = None
    loader_overhead_share: float | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, **figures: Any) -> EpochResult:
        """The row of cfg's epochs: what they ran with, and `figures` (a failure, say)."""
        return cls(cfg.loader, cfg.precision, cfg.compile, cfg.batch_size, cfg.width,
                   cfg.compile_mode, cfg.autotunes(), **figures)


def bench_loaders(cfg: TrainConfig, device: torch.device, args: argparse.Namespace,
                  log: Log = silent) -> list[LoaderResult]:
    """Every loader over the same split and augmentations, their epochs taken in turns so that
    a burst of load on a shared machine hits all of them alike (tools.timing.take_turns)."""
    data = prepare_data(cfg)
    results = {kind: LoaderResult(kind, cfg.batch_size) for kind in LOADERS}
    built: dict[str, BatchLoader] = {}
    for kind, r in results.items():
        try:
            built[kind], r.construct_s = build_loader(kind, data, cfg, device)
            r.batch_size = built[kind].batch_size  # capped at the split, as in training
        except MEASURE_ERRORS as error:
            r.status, r.reason = "failed", one_line(error)
    pin_threads(args.threads)
    take_turns([(results[kind], loader) for kind, loader in built.items()], args.epochs,
               MEASURE_ERRORS)
    baseline = results["torchvision"].images_per_s
    for r in results.values():
        if r.images_per_s and baseline:
            r.vs_torchvision = r.images_per_s / baseline
        log(f"loaders: {r.loader} " + (f"{r.images_per_s:,.0f} images/s" if r.images_per_s
                                       else f"{r.status}, {r.reason}"))
    return list(results.values())


def step_configs(base: TrainConfig, args: argparse.Namespace) -> list[TrainConfig]:
    """precision x memory format x compile at --batch-size, then the other batch sizes, then
    the other compile modes (when the engine's defaults compile)."""
    grid = [replace(base, precision=p, channels_last=f == "channels_last", compile=c == "on")
            for p in args.precisions for f in args.formats for c in args.compile]
    sweep_compile = base.compile and "on" in args.compile
    return (grid + [replace(base, batch_size=b, compile=sweep_compile)
                    for b in args.batch_sizes if b != base.batch_size]
            + [replace(base, compile=True, compile_mode=m) for m in args.compile_modes
               if sweep_compile and m != base.compile_mode])


def bench_step(cfg: TrainConfig, args: argparse.Namespace) -> StepResult:
    """Images/s of forward + backward + optimizer step on a fixed batch already on the device."""
    result = StepResult(cfg.precision, "channels_last" if cfg.channels_last else "contiguous",
                        cfg.compile, cfg.batch_size, cfg.width, cfg.compile_mode)
    try:
        run = make_run(cfg, args.threads)
        images, labels = next(iter(run.train_loader))
        result.batch_size = len(labels)  # a batch over the split is the split (BatchLoader)
        batches = repeat((images, labels))
        result.warmup_s = timed_steps(run, batches, args.warmup_steps)
        result.block_s = [timed_steps(run, batches, args.steps) for _ in range(args.repeats)]
    except MEASURE_ERRORS as error:
        # a configuration the engine refuses here (fp16 on a CPU) is skipped; out of memory, a
        # failed compile or a CUDA error is a failure, which makes the command exit 1
        skipped = isinstance(error, TrainingError)
        result.status, result.reason = "skipped" if skipped else "failed", one_line(error)
        return result
    result.steps = args.steps
    result.images_per_s = args.steps * result.batch_size / min(result.block_s)
    return result


def bench_steps(base: TrainConfig, args: argparse.Namespace, partial: Callable[[list], object],
                log: Log = silent) -> list[StepResult]:
    """Every step configuration, one after the other, freeing each before the next; partial
    gets the rows so far after each, before its line is logged (a run cut short keeps them)."""
    results = []
    for cfg in step_configs(base, args):
        results.append(bench_step(cfg, args))
        partial(results)
        r = results[-1]
        name = step_name(r.precision, r.memory_format, r.compile, r.compile_mode, r.batch_size)
        log(f"step: {name}: " + (f"{r.images_per_s:,.1f} images/s" if r.status == "ok"
                                 else r.reason))
        release()
    return results


def bench_epoch(cfg: TrainConfig, epochs: int, threads: int) -> EpochResult:
    """Full training epochs with cfg's loader (a warm-up epoch, then steady-state ones), then
    as many images as steps on one of its batches, to tell the loader's cost apart: as many
    times as steady epochs, the fastest of each set against the other."""
    r = EpochResult.of(cfg)
    try:
        start = time.perf_counter()
        run = make_run(cfg, threads)
        sync(run.accelerator.device)  # the build's queued GPU work belongs to its time
        r.build_s = time.perf_counter() - start
        r.batch_size = run.train_loader.batch_size  # capped at the split, as in training
        first = train_pass(run, 0)
        steady = [train_pass(run, e) for e in range(1, epochs + 1)]
        images, labels = next(iter(run.train_loader))  # the same images, no loader
        step_only_s = min(timed_epoch_steps(run, images, labels, first.images) for _ in steady)
    except MEASURE_ERRORS as error:
        r.status, r.reason = "failed", one_line(error)
        return r
    best = fastest(steady)
    r.images, r.first_epoch_s = first.images, first.seconds
    r.epoch_s, r.data_wait_s = [p.seconds for p in steady], [p.wait_s for p in steady]
    r.first_batch_wait_s = [p.first_wait_s for p in steady]
    r.data_wait_share, r.images_per_s = best.wait_s / best.seconds, best.images / best.seconds
    r.step_only_s, r.loader_overhead_share = step_only_s, 1 - step_only_s / best.seconds
    return r


def _epoch_to(connection: Connection, parent: int, cfg: TrainConfig, epochs: int,
              threads: int) -> None:
    """bench_epoch in the process bench_epoch_alone (process `parent`) started; its row goes
    to `connection`."""
    for stop in STOP_SIGNALS:  # a Ctrl-C reaches the whole group: the parent ends this one
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked as it started
    # a parent killed outright (the OOM killer) kills it too, rather than leave it on the GPU
    signal_at_parent_death(signal.SIGKILL)
    if os.getppid() != parent:  # killed already, before the request
        os._exit(1)
    connection.send(bench_epoch(cfg, epochs, threads))


def bench_epoch_alone(cfg: TrainConfig, epochs: int, threads: int) -> EpochResult:
    """bench_epoch in a fresh process. cuDNN keeps the plan it first ran for each convolution
    (per thread, for the life of the process) and looks it up before it asks whether to
    autotune: its cache key holds no autotuning flag (torch's aten/src/ATen/native/cudnn/
    Conv_v8.cpp, run_single_conv). After autotuned epochs, an untuned one in the same process
    would run their plans; nor would a thread of our own do, since a backward runs on the
    device's autograd worker thread, which every run shares (torch.autograd.grad_mode.
    set_multithreading_enabled's documentation)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_epoch_to, args=(send, os.getpid(), cfg, epochs, threads))
    # held until it ignores them: else a Ctrl-C in its seconds of imports printed its traceback
    # (as multiprocessing's resource tracker starts, which it does first: it then unblocks)
    resource_tracker.ensure_running()
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.start()
        finally:  # a stop that came meanwhile is raised from here on: the child goes with it
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        send.close()  # the child's end alone is left: its death reads as end-of-file
        try:
            row = receive.recv()
        except EOFError:  # it died before it answered
            row = None
        child.join()
    except BaseException:  # this process stops (Ctrl-C): the child ignores the stop signals
        if child.pid is not None:  # started
            child.kill()
            child.join()
        raise
    finally:
        send.close()
        receive.close()
    return row or EpochResult.of(cfg, status="failed",
                                 reason=f"its process ended with exit code {child.exitcode} "
                                        "before it gave a result")


def epoch_configs(base: TrainConfig, args: argparse.Namespace) -> list[TrainConfig]:
    """Each loader at the engine's defaults for the device, then, where those compile (CUDA),
    the default loader in the other --compile-modes: the engine's mode against the others; and
    on CUDA the default loader without cuDNN's autotuning, which the engine's runs did without
    until the first GPU run's figures (BENCHMARKS.md): the change's before, beside its after."""
    others = [m for m in args.compile_modes if m != base.compile_mode] if base.compile else []
    untuned = [replace(base, cudnn_benchmark=False)] if args.device == "cuda" else []
    return ([replace(base, loader=kind) for kind in LOADERS]
            + [replace(base, compile_mode=mode) for mode in others] + untuned)


def bench_epochs(base: TrainConfig, args: argparse.Namespace, partial: Callable[[list], object],
                 log: Log = silent) -> list[EpochResult]:
    """A full training epoch of each of epoch_configs; partial gets the rows so far after
    each."""
    results = []
    for cfg in epoch_configs(base, args):
        # untuned after the autotuned: cuDNN would reuse their plans (bench_epoch_alone)
        alone = args.device == "cuda" and not cfg.autotunes()
        results.append((bench_epoch_alone if alone else bench_epoch)(cfg, args.epochs,
                                                                     args.threads))
        partial(results)
        r = results[-1]
        name = epoch_name(r.loader, r.precision, r.compile, r.compile_mode, r.batch_size,
                          cudnn_benchmark=r.cudnn_benchmark)
        log(f"epoch: {name}: "
            + (f"{r.images_per_s:,.1f} images/s, data wait {r.data_wait_share:.1%} (the "
               f"first batch's: {ms_range(r.first_batch_wait_s)} ms), loader overhead "
               f"{overhead_text(r.loader_overhead_share)}" if r.status == "ok"
               else f"{r.status}, {r.reason}"))
        release()
    return results


def ms_range(seconds: list[float]) -> str:
    """Seconds as milliseconds, "3.1" or "3.1-4.2" from the least to the most."""
    low, high = (f"{1e3 * x:.1f}" for x in (min(seconds), max(seconds)))
    return low if low == high else f"{low}-{high}"

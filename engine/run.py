"""One training run's parts and its step: data, loaders, model, optimizer, schedule and the
accelerator that places them. engine/train.py, the LR range test and the tools share these."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from common.cli import stop_if_interrupted, stop_signals_end_at_once
from common.errors import TrainingError, one_line
from common.hardware import (
    launched,
    launched_processes,
    local_share,
    physical_cores,
    process_count,
)
from engine.config import PRECISIONS, TrainConfig
from engine.model import build_model
from engine.optimizers import build_optimizer, build_schedule
from loaders import make_loader
from loaders.base import BatchLoader
from loaders.preparation import Prepared, prepare

DTYPES = dict(zip(PRECISIONS, (torch.bfloat16, torch.float16, torch.float32), strict=True))
# what torchrun and accelerate launch set, besides accelerate's own ACCELERATE_*
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")
# what accelerate reads besides them: OMP_NUM_THREADS with int() in a multi-process CPU run
ACCELERATE_READS = (*LAUNCH_VARIABLES, "OMP_NUM_THREADS")


@dataclass
class Run:
    """Everything one training run holds; made once by `build`, used by the epoch loop."""

    cfg: TrainConfig  # resolved: loader, precision, compile and out are set
    accelerator: Accelerator
    data: Prepared
    train_loader: BatchLoader
    test_loader: BatchLoader
    model: nn.Module  # on the device; DDP-wrapped when distributed
    step_model: nn.Module  # `model`, compiled when cfg.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only: bf16 and fp32 need no loss scaling

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes: the run's dtype, or nothing in fp32."""
        return torch.autocast(self.accelerator.device.type, dtype=DTYPES[self.cfg.precision],
                              enabled=self.cfg.precision != "fp32")

    @property
    def unwrapped(self) -> nn.Module:
        """The model without DDP: what is saved and evaluated."""
        return self.accelerator.unwrap_model(self.model)


def run_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                 steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's LR schedule over all its steps, peaking at the optimizer's base LR."""
    return build_schedule(cfg.schedule, optimizer, cfg.epochs * steps_per_epoch,
                          warmup_frac=cfg.warmup)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The accelerator of a resolved config: device placement, processes, trackers.

    Mixed precision is ours (Run.autocast), not accelerate's: one process can then build
    runs of different precisions (tools/bench.py), and `accelerate launch --mixed_precision`
    cannot apply a second autocast on top of --precision.
    """
    cuda = torch.cuda.is_available()
    if cfg.precision == "fp16" and not cuda:
        raise TrainingError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU.")
    if not cuda and (problem := restarts_refused(cfg.out)):
        raise TrainingError(problem)
    try:
        # cpu=True is what makes accelerate use gloo for multi-process CPU runs (torchrun);
        # compiling is ours too (--compile): `accelerate launch --dynamo_backend` compiled the
        # model behind a run whose header and config.json said eager
        with stop_signals_end_at_once():  # several processes: a rendezvous, waiting in C++
            accelerator = Accelerator(cpu=not cuda, log_with=cfg.log_with,
                                      project_dir=cfg.out, mixed_precision="no",
                                      dynamo_backend="no")
    except ValueError as error:  # an unknown tracker, or a launcher's variable it cannot read
        raise TrainingError(f"{error}{unread_variable(error)}") from None
    except torch.distributed.DistNetworkError as error:  # rank 0 could not serve the store
        raise TrainingError(store_failed(error)) from None
    if not cuda:  # after Accelerator: under mpirun it is what sets WORLD_SIZE and LOCAL_...
        share_cores()
    return accelerator


def unread_variable(error: ValueError) -> str:
    """Which environment variable accelerate could not read, for its error, whose message
    gives the value only ("invalid literal for int() with base 10: 'abc'"): the one whose
    value the message quotes, else all it reads; "" when none is set."""
    read = {k: v for k, v in sorted(os.environ.items())
            if k in ACCELERATE_READS or k.startswith("ACCELERATE_")}
    quoted = [k for k, v in read.items() if repr(v) in str(error)]
    if len(quoted) == 1:
        return (f" (accelerate reads {quoted[0]}={read[quoted[0]]!r} from the environment: "
                "correct or unset it)")
    listed = ", ".join(f"{k}={v!r}" for k, v in read.items())
    return (f" (accelerate reads {listed} from the environment: correct or unset the one it "
            "cannot read)") if read else ""


def restarts_refused(out: str) -> str | None:
    """Why a CPU run of several processes that torchrun may restart (--max-restarts, which it
    passes on as TORCHELASTIC_MAX_RESTARTS) is refused, before its rendezvous; None where it
    may not. Restarted after a failure, the processes waited in gloo's rendezvous (minutes,
    until stopped) or failed there with a traceback, a plain script's too (torch 2.15); and
    the restart of a new run would find its own run in --out."""
    restarts = process_count(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if not restarts or launched_processes() < 2:
        return None
    return (f"torchrun --max-restarts {restarts} would start this run's processes again after a "
            "failure, and several CPU processes started again wait in gloo's rendezvous, or "
            "fail there, instead of training (the restart of a new run would also find its "
            "own run in --out); leave --max-restarts (accelerate launch: --max_restarts) out, "
            f"and continue a stopped run with --resume {out}.")


def store_failed(error: Exception) -> str:
    """The message for a process group that could not start its store at MASTER_ADDR and
    MASTER_PORT, which a process started without a launcher serves as rank 0 (torch's
    DistNetworkError traceback): most often the port is another program's."""
    where = (f"MASTER_ADDR={os.environ.get('MASTER_ADDR')!r} "
             f"MASTER_PORT={os.environ.get('MASTER_PORT')!r}")
    if "EADDRINUSE" in str(error):
        return (f"process 0 cannot serve the run's rendezvous at {where}: the port is in use "
                "(by another run, or another program); set MASTER_PORT to a free port, the "
                "same on every process of this run.")
    return (f"the run's processes cannot meet at {where} ({one_line(error, 160)}); check both "
            "variables, the same on every process of this run.")


def share_cores() -> None:
    """torch's CPU threads in a launched process: its share of the physical cores it may use
    (torch's own default counts physical cores too), or OMP_NUM_THREADS where fewer and not 1.
    A launcher's OMP_NUM_THREADS is a guess: torchrun sets 1 for several processes,
    accelerate launch 1 unless --cpu, and with --cpu the host's physical cores over the
    processes, blind to a cpuset; a one-process CPU run took one core where plain python takes
    them all. A 1 set by hand reads the same as a launcher's. Plain python: torch's own."""
    if not launched():
        return
    asked = process_count(os.environ.get("OMP_NUM_THREADS", ""))
    share = local_share(physical_cores(), launched_processes())
    torch.set_num_threads(share if asked in (None, 1) else min(asked, share))


def launcher_options_ignored() -> str | None:
    """A notice when `accelerate launch` was given a mixed precision or a dynamo backend (or
    `accelerate config` saved one): the run does not use them, its own options choose."""
    given = {option: os.environ.get(variable, "no") for option, variable in (
        ("--mixed_precision", "ACCELERATE_MIXED_PRECISION"),
        ("--dynamo_backend", "ACCELERATE_DYNAMO_BACKEND"))}
    given = {option: value for option, value in given.items() if value.lower() != "no"}
    if not given:
        return None
    return ("notice: accelerate launch's " + " and ".join(f"{o} {v}" for o, v in given.items())
            + " are not used: this engine's --precision and --compile (--compile-mode) choose, "
            "as the line above says.")


def loader_options(cfg: TrainConfig, data: Prepared, device: torch.device, rank: int = 0,
                   world_size: int = 1) -> dict:
    """The make_loader options a run uses for both splits (the workers shared by processes)."""
    return dict(device=device, mean=data.mean, std=data.std, dtype=DTYPES[cfg.precision],
                seed=cfg.seed, rank=rank, world_size=world_size, workers=cfg.workers)


def make_train_loader(kind: str, cfg: TrainConfig, data: Prepared,
                      options: dict) -> BatchLoader:
    """The `kind` loader of the training split at cfg's batch size and augmentations;
    `options`: loader_options'."""
    return make_loader(kind, data.train, train=True, batch_size=cfg.batch_size,
                       augment=cfg.augment(), **options)


def choose_algorithms(deterministic: bool, cudnn_autotune: bool) -> None:
    """torch's deterministic algorithms on or off, and cuDNN's autotuning, for the runs built
    from now on. Two CUDA runs of one config otherwise drift apart: some of cuDNN's backward
    kernels add with atomics, in no fixed order (benchmarks/results/resume-noise-threads-cpu-
    2core.log shows how far another summing order takes this recipe). An op with no
    deterministic version warns, not fails."""
    if deterministic:  # cuBLAS reads it when it starts, at the first CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # cuDNN times its convolution algorithms once per input shape and keeps the fastest, where
    # its heuristics otherwise pick one untimed; airbench turns it on when imported, too
    torch.backends.cudnn.benchmark = cudnn_autotune


def build(cfg: TrainConfig, accelerator: Accelerator) -> Run:
    """Data, loaders, model, optimizer and schedule of a resolved config, placed by accelerate.

    With --lr auto the optimizer starts at LR 0: engine.lr_range sets it.
    """
    # The global main process prepares first; then each other node's local main process (on a
    # shared file system it finds the files made; on a node's own disk it makes them once);
    # then everyone else, who only reads them.
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        data = prepare(cfg.dataset, Path(cfg.data_dir), cfg.synthetic_size, workers=cfg.workers)
    shared = loader_options(cfg, data, accelerator.device, accelerator.process_index,
                            accelerator.num_processes)
    train_loader = make_train_loader(cfg.loader, cfg, data, shared)
    test_loader = make_loader(cfg.loader, data.test, train=False,
                              batch_size=2 * cfg.batch_size, **shared)
    torch.manual_seed(cfg.seed)  # same initial weights on every process and every rerun
    choose_algorithms(cfg.deterministic, cfg.autotunes())
    model = build_model(cfg.arch, len(data.classes), cfg.width).to(accelerator.device)
    if cfg.channels_last:  # before prepare, so DDP's buckets see the final layout
        model = model.to(memory_format=torch.channels_last)
    lr = 0.0 if cfg.lr == "auto" else float(cfg.lr)
    optimizer = build_optimizer(cfg.optimizer, model, lr, cfg.weight_decay, cfg.momentum,
                                cfg.decay_norm_bias, fused=accelerator.device.type == "cuda")
    # stepped by us once per batch; accelerate would step a prepared one once per process
    scheduler = run_schedule(cfg, optimizer, len(train_loader))
    model = accelerator.prepare(model)  # DDP when distributed; the optimizer stays plain
    # one static graph for the batch size; train_step runs any other size eagerly, since a
    # second size would compile again, and dynamo would then prefer a dynamic-shape graph
    step_model = (torch.compile(model, dynamic=False, mode=cfg.compile_mode) if cfg.compile
                  else model)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    # a Ctrl-C that Python dropped in a finalizer meanwhile (numba's, as FFCV compiles a
    # loader) stops the run here, not after the first step, which may compile for a minute
    stop_if_interrupted()
    return Run(cfg, accelerator, data, train_loader, test_loader, model, step_model, optimizer,
               scheduler, scaler)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step; returns (loss summed over the batch, correct) without a host sync."""
    if not run.cfg.channels_last:
        images = images.contiguous()
    # the compiled graph is for full batches (see build); the loader's, capped at the shard
    model = run.step_model if len(labels) == run.train_loader.batch_size else run.model
    # the last step's gradients go before the forward: with CUDA graphs (reduce-overhead) they
    # live in the graphs' memory, which the next replay takes back; and the peak memory is lower
    run.optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=run.cfg.label_smoothing)
    if run.scaler is None:
        run.accelerator.backward(loss)
        run.optimizer.step()
    else:
        run.accelerator.backward(run.scaler.scale(loss))
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.scheduler.step()
    return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()


def endless(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, epoch after epoch: for a sweep or a profile longer than one epoch."""
    for epoch in itertools.count():
        run.train_loader.set_epoch(epoch)
        yield from run.train_loader

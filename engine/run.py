"""One training run's parts and its step: data, loaders, model, optimizer and schedule, placed
by the accelerator engine.launch makes. engine/train.py, the LR range test and the tools share
these."""

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

from common.stop_signals import stop_if_interrupted
from engine.config import PRECISIONS, TrainConfig
from engine.model import build_model
from engine.optimizers import build_optimizer, build_schedule, fuses
from loaders import make_loader
from loaders.base import BatchLoader
from loaders.preparation import Prepared, prepare

DTYPES = dict(zip(PRECISIONS, (torch.bfloat16, torch.float16, torch.float32), strict=True))


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


def prepare_data(cfg: TrainConfig) -> Prepared:
    """The config's dataset as .beton files in its --data-dir, made there when needed."""
    return prepare(cfg.dataset, Path(cfg.data_dir), cfg.synthetic_size, workers=cfg.workers)


def loader_options(cfg: TrainConfig, data: Prepared, device: torch.device, rank: int = 0,
                   world_size: int = 1) -> dict:
    """The make_loader options a run uses for both splits (the workers shared by processes)."""
    return dict(device=device, mean=data.mean, std=data.std, dtype=DTYPES[cfg.precision],
                channels_last=cfg.channels_last, seed=cfg.seed, rank=rank,
                world_size=world_size, workers=cfg.workers)


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
        data = prepare_data(cfg)
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
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    optimizer = build_optimizer(cfg.optimizer, model, lr, cfg.weight_decay, cfg.momentum,
                                cfg.decay_norm_bias, fused=fuses(cfg.optimizer, accelerator.device,
                                                                 scaled=scaler is not None))
    # stepped by us once per batch; accelerate would step a prepared one once per process
    scheduler = run_schedule(cfg, optimizer, len(train_loader))
    model = accelerator.prepare(model)  # DDP when distributed; the optimizer stays plain
    # one static graph for the batch size (dynamic=False: never a symbolic-shape one);
    # train_step runs any other size eagerly, since a second size would compile, and with CUDA
    # graphs record, a second graph for one batch an epoch
    step_model = (torch.compile(model, dynamic=False, mode=cfg.compile_mode) if cfg.compile
                  else model)
    # a Ctrl-C that Python dropped in a finalizer meanwhile (numba's, as FFCV compiles a
    # loader) stops the run here, not after the first step, which may compile for a minute
    stop_if_interrupted()
    return Run(cfg, accelerator, data, train_loader, test_loader, model, step_model, optimizer,
               scheduler, scaler)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step; returns (loss summed over the batch, correct) without a host sync."""
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

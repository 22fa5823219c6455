"""The classic baseline: a per-image Dataset with PIL transforms and a multi-worker DataLoader,
with the same augmentations as augment.py. Kept to measure what the other loaders save."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils import signal_handling
from torchvision import transforms

from common.errors import LoaderError, one_line
from common.hardware import beyond_cores
from common.stop_signals import STOP_SIGNALS, stop_signals_held
from loaders import beton
from loaders.augment import epoch_generator
from loaders.base import Batch, BatchLoader
from loaders.options import AugmentConfig


class Cutout:
    """Zero a size x size square centred uniformly in a normalized C x H x W tensor."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        top = int(torch.randint(h, ())) - self.size // 2
        left = int(torch.randint(w, ())) - self.size // 2
        x[:, max(top, 0):max(top + self.size, 0), max(left, 0):max(left + self.size, 0)] = 0
        return x


def pil_transform(cfg: AugmentConfig | None, mean: list[float],
                  std: list[float]) -> transforms.Compose:
    """The per-image torchvision pipeline a notebook would write for the same augmentations."""
    steps = []
    if cfg is not None and cfg.translate:
        mode = "reflect" if cfg.reflect else "constant"
        steps.append(transforms.RandomCrop(32, padding=cfg.translate, padding_mode=mode))
    if cfg is not None and cfg.flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if cfg is not None and cfg.cutout:
        steps.append(Cutout(cfg.cutout))
    return transforms.Compose(steps)


class ImageDataset(Dataset):
    """uint8 HWC images and labels as PIL images through `transform`, one at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _stop_quietly(worker_id: int) -> None:
    """A worker's init: Ctrl-C, SIGTERM and SIGHUP, which a terminal, `timeout` or Slurm send to
    the whole group, end it as torch's worker loop ends on Ctrl-C, quietly and with status 0 (the
    parent stops). torch's own SIGTERM handler lets a SIGTERM not sent by the parent kill the
    worker, which the parent then reported after its own line: 'Exception ignored in:
    <function _MultiProcessingDataLoaderIter.__del__ ...> ... RuntimeError: DataLoader worker
    (pid N) is killed by signal: Terminated.' The worker starts with them blocked (__iter__),
    so none reaches torch's handler before this one replaces it. One the command ignores (a
    script's background job ignores Ctrl-C) the worker ignores too: killed by it, the parent
    carried on and failed on its dead workers."""
    for stop in STOP_SIGNALS:
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _ShardSampler(Sampler[int]):
    def __init__(self, owner: BatchLoader):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.indices().tolist())

    def __len__(self) -> int:
        return self.owner.shard_size


def _worker_failure() -> RuntimeError | None:
    """torch's error for a DataLoader worker of this process that died (what its SIGCHLD
    handler raises), or None while they all live."""
    try:
        signal_handling._error_if_any_worker_fails()
    except RuntimeError as error:
        return error
    return None


class TorchvisionLoader(BatchLoader):
    """The seed's way: a DataLoader of per-image PIL transforms in worker processes; the
    baseline the other loaders are measured against."""

    def __init__(self, path: Path, *, augment: AugmentConfig | None = None,
                 mean: list[float], std: list[float], **kwargs: Any):
        split = beton.read(Path(path))
        super().__init__(path, num_samples=len(split.labels), augment=augment, mean=mean,
                         std=std, **kwargs)
        if problem := beyond_cores("--workers", self.workers):  # each worker is a process
            raise LoaderError(problem)
        transform = pil_transform(augment if self.train else None, mean, std)
        # Workers forked, as by default up to Python 3.13: 3.14's default start method,
        # forkserver, pickles the dataset (the whole split: 150 MB of CIFAR-10's) to each
        # worker of each epoch, 1 to 3 s before an epoch's first batch on 2 workers
        # (benchmarks/results/dataloader-start-method-py314-cpu-2core.log)
        forked = (multiprocessing.get_context("fork") if self.workers > 0
                  and "fork" in multiprocessing.get_all_start_methods() else None)
        # Workers live for one epoch, as with DataLoader's defaults: they are then joined when
        # the epoch ends. Persistent ones are only stopped when the DataLoader is freed, and
        # freed by the cycle collector (a loader in any reference cycle) each waits out a 5 s
        # timeout, its queue closed before the message to stop was sent.
        self.loader = DataLoader(
            ImageDataset(split.images, split.labels, transform),
            batch_size=self.batch_size, sampler=_ShardSampler(self), num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=forked, worker_init_fn=_stop_quietly)

    def __iter__(self) -> Iterator[Batch]:
        # the workers' seeds come from this generator: one per (seed, epoch, rank), so an epoch
        # draws the same augmentations whatever ran before it (a resumed run, a replayed epoch)
        # with the same --workers (each worker draws for the batches it is dealt)
        self.loader.generator = epoch_generator(self.seed, self.epoch, "cpu", rank=self.rank)
        dtype = self.augment.dtype
        # held while iter() forks the workers: Python drops a KeyboardInterrupt raised in an
        # at-fork hook (logging's), and the command ran on; and blocked in this thread, so that
        # the workers start with them blocked until _stop_quietly
        with stop_signals_held():
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                batches = iter(self.loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            for images, labels in batches:
                images = images.to(self.device, dtype, non_blocking=True)
                yield (images.contiguous(memory_format=self.augment.memory_format),
                       labels.to(self.device, non_blocking=True))
        except (RuntimeError, OSError, EOFError) as error:  # asked while its workers are known
            if (died := self.worker_died(error)) is None:
                raise
            raise died from error

    def worker_died(self, error: BaseException) -> LoaderError | None:
        """The LoaderError for torch's words of a worker that is gone ("... exited
        unexpectedly", "... is killed by signal: Killed.", the OOM killer's most often), else
        None. Raised in next(), or, by the handler torch installs for SIGCHLD, wherever the
        main thread is when the worker dies (the training loop asks this too): there it can
        break the code it interrupts, whose own error then holds torch's in its context (inside
        Thread.start, threading's bookkeeping raised a KeyError)."""
        while error is not None and not (isinstance(error, RuntimeError)
                                         and str(error).startswith("DataLoader worker")):
            error = error.__context__
        # a worker that died handing a batch over broke the connection its shared memory
        # comes through (a ConnectionResetError in next()) before torch's handler said why:
        # torch is asked, as that handler asks it
        error = error or _worker_failure()
        if error is None:
            return None
        return LoaderError(
            f"a --loader torchvision worker reading {self.path} died ({one_line(error)}); most "
            f"often the system ran out of memory: pass fewer --workers (here {self.workers}), "
            "or use --loader ffcv.")

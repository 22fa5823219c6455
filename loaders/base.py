"""What every loader shares: its shard of the data per epoch and the on-device augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from common.hardware import default_workers
from loaders.augment import Augment
from loaders.options import AugmentConfig
from loaders.sharding import epoch_indices, padding

# images N x 3 x 32 x 32 in the loader's memory format (channels_last by default), labels int64
Batch = tuple[torch.Tensor, torch.Tensor]


class BatchLoader:
    """Iterates (images, labels) batches of one split on `device`; `set_epoch` picks the epoch.

    Training loaders shuffle and augment; evaluation loaders are sequential and plain.
    """

    def __init__(self, path: Path, *, train: bool, batch_size: int, device: torch.device | str,
                 num_samples: int, mean: list[float], std: list[float],
                 dtype: torch.dtype = torch.float32, augment: AugmentConfig | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int | None = None,
                 channels_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path, self.train = Path(path), train
        self.device = torch.device(device)
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size = rank, world_size
        # a batch larger than the shard is the whole shard: capped, so that no loader sizes its
        # buffers by the option (FFCV's would overflow at --batch-size 10**15)
        self.batch_size = min(batch_size, max(self.shard_size, 1))
        self.workers = workers or default_workers(world_size)
        # batches in the model's memory format: a contiguous model given channels_last ones
        # would need a copy per batch, or run other kernels and a transpose per convolution
        self.augment = Augment(augment if train else None, mean, std, dtype, self.device,
                               channels_last)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.augment.set_epoch(self.seed, epoch, self.rank)

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's sample indices for the current epoch."""
        return epoch_indices(self.num_samples, epoch=self.epoch, seed=self.seed,
                             shuffle=self.train, rank=self.rank, world_size=self.world_size,
                             device=device)

    @property
    def padding(self) -> int:
        """Samples repeated per epoch (over all ranks) so that every rank takes as many steps."""
        return padding(self.num_samples, self.world_size) if self.train else 0

    @property
    def shard_size(self) -> int:
        """Samples this rank visits per epoch, padding included."""
        return len(range(self.rank, self.num_samples + self.padding, self.world_size))

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def worker_died(self, error: BaseException) -> Exception | None:
        """The error to raise instead of `error` when it says a worker process of this loader
        died; None here, where no loader has worker processes but the torchvision one."""
        return None

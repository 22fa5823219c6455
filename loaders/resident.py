"""The whole split held on the device (as airbench's loader holds it), normalized once in the
output dtype when it is loaded, and padded and mirrored then too (Augment.store); each epoch
is a permutation (sharding's, drawn on the CPU) on the device and one gather of whole image
rows per large chunk (sample order, flip and translate together; ours, where airbench crops
by masked copies), so the host does nothing per batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from loaders import beton
from loaders.base import Batch, BatchLoader

CHUNK = 16_384  # images augmented at once: large enough to saturate a GPU, bounded in memory


class ResidentLoader(BatchLoader):
    """A .beton split read once into device memory, augmented and batched there."""

    def __init__(self, path: Path, **kwargs: Any):
        split = beton.read(Path(path))
        super().__init__(path, num_samples=len(split.labels), **kwargs)
        self.images = self.augment.store(torch.from_numpy(split.images).to(self.device))
        self.labels = torch.from_numpy(split.labels).to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        order = self.indices(self.device)
        chunk = max(CHUNK // self.batch_size, 1) * self.batch_size
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            images, labels = self.augment(self.images, index=part), self.labels[part]
            for i in range(0, len(part), self.batch_size):
                yield images[i:i + self.batch_size], labels[i:i + self.batch_size]

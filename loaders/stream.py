"""Streaming FFCV loader: decode raw pixels on CPU threads, move uint8 to the device, and
augment there with augment.py. Our sample order (shared by all loaders) goes in through
FFCV's order hook; loaders.guards turns a dying pipeline thread into an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loaders import beton
from loaders.base import Batch, BatchLoader
from loaders.guards import guarded, importing_ffcv, numba_workers, torch_threads_kept

with importing_ffcv():
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder


class _ShardOrder(TraversalOrder):
    """Hands FFCV our per-epoch shard (loaders.sharding) instead of its own order."""

    def __init__(self, owner: BatchLoader):
        self.owner = owner

    def __call__(self, loader: Loader) -> _ShardOrder:
        # FFCV 1.0.2 checks `isinstance(order, TraversalOrder)` and then calls `order(loader)`,
        # so a custom order must be an instance that is also callable.
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.owner.indices().numpy()  # FFCV's own epoch counter is ignored: ours rules


class FFCVLoader(BatchLoader):
    """FFCV's Loader decoding the .beton in numba threads; our augmentation on the device."""

    def __init__(self, path: Path, **kwargs: Any):
        num_samples = beton.check(Path(path)).num_samples  # a damaged file: DataError, not FFCV's
        super().__init__(path, num_samples=num_samples, **kwargs)
        # A blocking copy: FFCV 1.0.2 decodes each batch into one of a few pinned host buffers
        # and its CUDA events guard only the device buffers, so an asynchronous copy still
        # queued behind the training kernels could read a buffer already refilled (found by
        # reading its epoch_iterator.py; PyTorch leaves the source's lifetime to the caller).
        # The wait is in FFCV's own thread; when the GPU is the bottleneck it reaches the
        # training loop as time in next() (tools/bench.py's loader overhead tells them apart).
        to_device = [ToDevice(self.device, non_blocking=False)] if self.device.type != "cpu" else []
        with torch_threads_kept():  # Loader() sets torch's threads to num_workers
            self.loader = Loader(
                str(path), batch_size=self.batch_size, num_workers=numba_workers(self.workers),
                order=_ShardOrder(self), drop_last=False, os_cache=True,
                pipelines={
                    "image": [SimpleRGBImageDecoder(), ToTensor(), *to_device],
                    # Squeeze(1), not Squeeze(): a last batch of one sample keeps its batch
                    # dimension, which ToDevice indexes
                    "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
                },
            )

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in guarded(self.loader):
            # FFCV reuses its output buffers a few batches later: labels must be copied out
            yield self.augment(images), labels.view(-1).clone()

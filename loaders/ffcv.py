"""Streaming FFCV loader: decode raw pixels on CPU threads, move uint8 to the device, and
augment there with augment.py.

Two guards around FFCV 1.0.2: a custom sample order (ours, shared by all loaders) and a clear
error, instead of a hang, when its pipeline thread dies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from loaders.base import Batch, BatchLoader


class LoaderError(RuntimeError):
    """FFCV's pipeline failed on a worker thread."""


def _record_pipeline_failure(args: threading.ExceptHookArgs) -> None:
    """A dying EpochIterator keeps its consumer waiting forever on a queue; instead record the
    error and wake the consumer with FFCV's end-of-epoch marker, so `guarded` can raise."""
    thread = args.thread
    if isinstance(thread, EpochIterator):
        thread.failure = args.exc_value
        thread.output_queue.put(None)
    else:
        _previous_excepthook(args)


_previous_excepthook = threading.excepthook
threading.excepthook = _record_pipeline_failure


def guarded(loader: Loader) -> Iterator[tuple]:
    """Iterate an FFCV Loader, raising LoaderError when its pipeline thread fails."""
    epoch = iter(loader)
    yield from epoch
    failure = getattr(epoch, "failure", None)
    if failure is not None:
        raise LoaderError(f"FFCV's pipeline failed while reading {loader.reader.file_name}: "
                          f"{type(failure).__name__}: {failure}") from failure


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
    def __init__(self, path: Path, **kwargs):
        num_samples = int(Reader(str(path)).num_samples)
        super().__init__(path, num_samples=num_samples, **kwargs)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        self.loader = Loader(
            str(path), batch_size=self.batch_size, num_workers=self.workers,
            order=_ShardOrder(self), drop_last=False, os_cache=True,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), *to_device],
                "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device],
            },
        )

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in guarded(self.loader):
            # FFCV reuses its output buffers a few batches later: labels must be copied out
            yield self.augment(images), labels.view(-1).clone()

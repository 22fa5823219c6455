"""Streaming FFCV loader: decode raw pixels on CPU threads, move uint8 to the device, and
augment there with augment.py. Our sample order (shared by all loaders) goes in through
FFCV's order hook; loaders.guards turns a dying pipeline thread into an error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loaders import beton
from loaders.base import Batch, BatchLoader
from loaders.guards import guarded, importing_ffcv, numba_workers, torch_threads_kept

with importing_ffcv():
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToTensor
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
        # the copies to a GPU: on a stream of their own, which never waits for training (ours).
        # High priority: torch hands out the 32 streams of each priority's pool in turn, and
        # FFCV takes 5 of the default priority's every epoch (waiting there for training's
        # work), as do CUDA graphs; none takes from this pool
        self.copy_stream = (torch.cuda.Stream(self.device, priority=-1)
                            if self.device.type == "cuda" else None)
        self.workers = numba_workers(kwargs.get("workers"), self.workers)
        with torch_threads_kept():  # Loader() sets torch's threads to num_workers
            self.loader = Loader(
                str(path), batch_size=self.batch_size, num_workers=self.workers,
                order=_ShardOrder(self), drop_last=False, os_cache=True,
                pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                           "label": [IntDecoder(), ToTensor()]},
            )

    def __iter__(self) -> Iterator[Batch]:
        # closed by name: Python 3.12.3 (Ubuntu 24.04's, the GPU image's) closes a generator
        # without freeing what its for loops iterate (3.12.1 and 3.13.0 free it; likely CPython
        # gh-118272), so an epoch left early kept FFCV's pipeline thread running until this
        # generator was freed (benchmarks/results/ubuntu-24.04-setup-cpu-2core.log)
        with closing(guarded(self.loader)) as batches:
            for images, labels in batches:
                images, labels = self.owned(images, labels.view(-1))
                yield self.augment(images), labels

    def owned(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """The batch in memory of its own: FFCV's thread refills its host buffers once the next
        batch is asked for. On the CPU the labels are cloned (augmenting writes new images); on
        a GPU both are copied there, and the copy has finished when this returns.

        Not FFCV's ToDevice: it copies on streams that first wait for the training work queued
        when the batch before was handed over, so the training loop gets each batch only once
        the GPU has nearly caught up with it (our reading of FFCV 1.0.2's epoch_iterator.py).
        Our stream holds these copies alone: waiting for it takes a copy's time, and training
        runs ahead of the GPU as far as with the resident loader. The copies are recorded on
        the training stream, so that their memory is not reused before that stream is done."""
        if self.copy_stream is None:
            return images, labels.clone()
        with torch.cuda.stream(self.copy_stream):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        self.copy_stream.synchronize()  # FFCV's buffers read; training's kernels come after
        training = torch.cuda.current_stream(self.device)
        images.record_stream(training)
        labels.record_stream(training)
        return images, labels

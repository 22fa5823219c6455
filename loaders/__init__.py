"""Data: from a download to augmented batches on the device. Knows nothing of models."""

from __future__ import annotations

from pathlib import Path

import torch

# Importing FFCV sets torch's thread count to 1 (ffcv/pipeline/compiler.py), which would make
# CPU training silently single-threaded. Every module here imports FFCV after this package, so
# importing it once here and restoring the count fixes it for all of them.
_threads = torch.get_num_threads()
import ffcv.pipeline.compiler  # noqa: E402, F401

torch.set_num_threads(_threads)

from loaders.base import BatchLoader  # noqa: E402

LOADERS = ("ffcv", "resident", "torchvision")


def make_loader(kind: str, path: Path, **kwargs) -> BatchLoader:
    """A loader of one .beton split by name; kwargs are BatchLoader's (train, batch_size, ...)."""
    if kind == "ffcv":
        from loaders.ffcv import FFCVLoader as cls
    elif kind == "resident":
        from loaders.resident import ResidentLoader as cls
    elif kind == "torchvision":
        from loaders.torchvision import TorchvisionLoader as cls
    else:
        raise ValueError(f"unknown loader '{kind}'; choose one of {', '.join(LOADERS)}")
    return cls(path, **kwargs)

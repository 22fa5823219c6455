"""Data: from a download to augmented batches on the device. Knows nothing of models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the loader itself, not with this package's names
    from loaders.base import BatchLoader

LOADERS = ("ffcv", "resident", "torchvision")


def make_loader(kind: str, path: Path, **kwargs) -> BatchLoader:
    """A loader of one .beton split by name; kwargs are BatchLoader's (train, batch_size, ...).

    Each loader's module is imported only when it is asked for: FFCV and torchvision are heavy.
    """
    if kind == "ffcv":
        from loaders.stream import FFCVLoader as cls
    elif kind == "resident":
        from loaders.resident import ResidentLoader as cls
    elif kind == "torchvision":
        from loaders.baseline import TorchvisionLoader as cls
    else:
        raise ValueError(f"unknown loader '{kind}'; choose one of {', '.join(LOADERS)}")
    return cls(path, **kwargs)

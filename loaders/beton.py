"""FFCV .beton files: written once with FFCV's own DatasetWriter, atomically, and cached by the
content of their source; read back in bulk without a Loader (for data held on the device)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.files import atomic_write
from loaders.cifar import ROW_SIZE, Split
from loaders.guards import torch_threads_kept

FORMAT = 1  # bump when the layout of the .beton or its sidecar changes


@dataclass(frozen=True)
class BetonInfo:
    """What the sidecar `<name>.beton.json` records about a .beton and its source."""

    format: int
    num_samples: int
    source_digest: str
    classes: list[str]
    mean: list[float]  # per-channel, in 0..1, of the training split this file belongs to
    std: list[float]


def digest(split: Split) -> str:
    """Content hash of a split: the .beton is rebuilt exactly when this changes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(split.images).data)
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).data)
    return h.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in 0..1, accumulated in float64 chunks to bound memory."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for chunk in np.array_split(images, max(1, len(images) // 8192)):
        pixels = chunk.reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    return mean.tolist(), np.sqrt(total_sq / count - mean**2).tolist()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_info(path: Path) -> BetonInfo | None:
    """The sidecar of a .beton, or None when either is missing or unreadable."""
    try:
        return BetonInfo(**json.loads(sidecar(path).read_text())) if path.is_file() else None
    except (OSError, ValueError, TypeError):
        return None


class _Rows:
    """The indexable dataset DatasetWriter asks for: (HWC uint8 image, int label) pairs."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.split.images[i], int(self.split.labels[i])


def write(path: Path, split: Split, classes: list[str],
          stats: tuple[list[float], list[float]] | None = None, workers: int = 1) -> BetonInfo:
    """Write split to path unless an up-to-date copy is there; return its sidecar info.

    stats: the normalization (mean, std) to record; None computes it from this split, and
    only when the file has to be (re)written. The file is written under a temporary name
    and renamed, so a crash or Ctrl-C never leaves a half file under the final name;
    temporaries of killed writers are swept here.
    """
    with torch_threads_kept():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    source = digest(split)
    old = read_info(path)
    if old is not None and (old.format, old.num_samples, old.source_digest, old.classes) == (
            FORMAT, len(split.labels), source, classes) and stats in (None, (old.mean, old.std)):
        return old
    info = BetonInfo(FORMAT, len(split.labels), source, classes,
                     *(stats or channel_stats(split.images)))
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)  # an old sidecar must never vouch for a new file
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    atomic_write(path, lambda tmp: DatasetWriter(str(tmp), fields, num_workers=workers)
                 .from_indexed_dataset(_Rows(split), chunksize=1000, shuffle_indices=False))
    atomic_write(sidecar(path), lambda tmp: tmp.write_text(json.dumps(asdict(info), indent=1)))
    return info


def read(path: Path) -> Split:
    """All images (N x 32 x 32 x 3 uint8) and labels of a raw-image .beton, read in bulk.

    Raw RGBImageField samples are stored verbatim at metadata['image']['data_ptr'], so a
    memory map gives them back without compiling an FFCV pipeline.
    """
    with torch_threads_kept():
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.reader import Reader
        from ffcv.types import ALLOC_TABLE_TYPE

    try:
        reader = Reader(str(path))
        # metadata columns are named f0, f1, ... in field order
        column = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
        image, label = reader.metadata[column["image"]], reader.metadata[column["label"]]
    except Exception as error:  # FFCV raises assorted errors on foreign or truncated files
        raise DataError(
            f"{path} is not a readable .beton ({error}); delete it to rebuild it.") from error
    if (image["mode"] != IMAGE_MODES["raw"]).any() or (image["height"] != 32).any() \
            or (image["width"] != 32).any():
        raise DataError(f"{path} does not hold raw 32x32 images; delete it to rebuild it.")
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    # the allocation table ends the file: a cut file leaves a partial table, or images whose
    # allocations are missing from it
    table_bytes = len(blob) - int(reader.header["alloc_table_ptr"])
    if table_bytes % ALLOC_TABLE_TYPE.itemsize or not np.isin(
            image["data_ptr"], reader.alloc_table["ptr"]).all():
        raise DataError(f"{path} is truncated; delete it to rebuild it.")
    # one vectorised gather: row i of the window view is the nbytes starting at byte i
    windows = np.lib.stride_tricks.sliding_window_view(blob, ROW_SIZE)
    images = windows[image["data_ptr"].astype(np.int64)].reshape(-1, 32, 32, 3)
    return Split(images, np.array(label, dtype=np.int64))  # a copy: FFCV maps it read-only

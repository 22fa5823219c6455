"""FFCV .beton files: written once with FFCV's own DatasetWriter, atomically, and cached by the
content of their source; read back in bulk with numpy alone, neither a Loader nor an import of
FFCV (for data held on the device, the torchvision DataLoader and the tools)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.atomic import ENCODING, atomic_write, write_json
from common.errors import DataError
from common.hashing import file_hash
from common.paths import room_fix
from common.temporaries import sweep_temporaries
from loaders.cifar import Split
from loaders.folders import SPLITS
from loaders.guards import guarded_writer, importing_ffcv
from loaders.layouts import ROW_SIZE
from loaders.python_folder import data_options

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the layout of the .beton or its sidecar changes


@dataclass(frozen=True)
class BetonInfo:
    """What the sidecar `<name>.beton.json` records about a .beton and its source."""

    format: int
    num_samples: int
    source_digest: str
    classes: list[str]
    mean: list[float]  # per-channel, in 0..1, of the training split this file belongs to
    std: list[float]
    size: int  # bytes of the .beton: a cut or padded file is caught without reading it
    file_digest: str  # blake2b of the .beton's bytes: overwritten bytes are caught too


IMAGE_OVERHEAD = 64  # bytes per image besides its pixels: metadata row and allocation entry
PAGE_SIZE = 4 << 21  # FFCV's default page (4 x 2 MiB); each writer worker leaves one partial
# the least std a channel is given (one grey level, ours): a channel that never varies (a dataset
# whose blue is always 0) would otherwise be divided by 0, and every loss would be NaN
MIN_STD = 1 / 255
STATS_CHUNK = 8192  # images channel_stats takes at once: 200 MB of float64 pixels


def digest(split: Split) -> str:
    """Content hash of a split: the .beton is rebuilt exactly when this changes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(split.images).data)
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).data)
    return h.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in 0..1, accumulated in float64 chunks to bound memory; std is
    at least MIN_STD."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for chunk in np.array_split(images, max(1, len(images) // STATS_CHUNK)):
        pixels = chunk.reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    variance = np.maximum(total_sq / count - mean**2, 0)  # rounding makes a constant's < 0
    return mean.tolist(), np.maximum(np.sqrt(variance), MIN_STD).tolist()


def file_name(tag: str, split: str) -> str:
    """The name of the .beton of `split` of the data `tag` names (preparation.beton_paths'
    tag: the dataset, or the python folder it was read from)."""
    return f"{tag}-{split}.beton"


def tag_of(name: str) -> str | None:
    """The tag a .beton named by file_name was named with, or None for another name."""
    match = re.fullmatch(rf"(.+)-(?:{'|'.join(SPLITS)})\.beton", name)
    return match[1] if match else None


SIDECAR_SUFFIX = ".json"


def sidecar(path: Path) -> Path:
    """Where the .beton at `path` keeps its BetonInfo: `<name>.beton.json` beside it."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, read in blocks (0.12 s for CIFAR-10's 169 MB on 2 CPU cores:
    benchmarks/results/beton-verify-cpu-2core.log)."""
    return file_hash(path, hashlib.blake2b(digest_size=16))


def damage(path: Path, info: BetonInfo, full: bool = True) -> str | None:
    """Why path does not match its sidecar (size, then content when full), or None if it does."""
    size = path.stat().st_size
    if size != info.size:
        return f"it holds {size} bytes where its sidecar records {info.size}"
    if full and file_digest(path) != info.file_digest:
        return "its content differs from the hash its sidecar records"
    return None


def check(path: Path, full: bool = False) -> BetonInfo:
    """The sidecar info of a .beton about to be read; DataError when it is missing or damaged.

    Only the size is compared unless `full` (the hash too): loaders open files that prepare()
    has just verified in full, where the tools read the test split a checkpoint recorded,
    which nothing has (its hash: 0.12 s for 50,000 CIFAR images, file_digest's log).
    """
    info, why = sidecar_state(path)
    if info is None:
        raise DataError(f"{path} {why}; {rebuild_advice(path)}.")
    why = damage(path, info, full)
    if why:
        raise DataError(f"{path} is damaged ({why}); {rebuild_advice(path)} from its source.")
    return info


def rebuild_advice(path: Path) -> str:
    """How to make the .beton at `path` again: the prepare command of the data its name
    (file_name's) and folder say."""
    tag = tag_of(path.name)
    options = data_options(tag) if tag else None
    if options is None:  # renamed by hand
        return ("run `python loaders/prepare.py` with the run's --dataset and --data-dir (or "
                "training) to rebuild it")
    command = f"python loaders/prepare.py {options} --data-dir {shlex.quote(str(path.parent))}"
    return f"run `{command}` (or training) to rebuild it"


def space_needed(num_samples: int, workers: int) -> int:
    """An upper bound on a raw-image .beton's size: pixels and per-image overhead, plus one
    partial page per worker and the header pages (50,000 CIFAR images with 2 workers: 168,972,160
    bytes measured, 190,354,432 bound; benchmarks/results/beton-verify-cpu-2core.log)."""
    return num_samples * (ROW_SIZE + IMAGE_OVERHEAD) + (workers + 2) * PAGE_SIZE


def check_space(folder: Path, needed: int) -> None:
    """DataError naming folder when its disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"{folder} has {free / 1e6:.1f} MB free but writing this .beton needs "
                        f"about {needed / 1e6:.1f} MB; free some space or choose another "
                        "--data-dir.")


def sidecar_state(path: Path) -> tuple[BetonInfo | None, str | None]:
    """The sidecar info of the .beton at path, or None and why it cannot be used, to follow
    the file's name in a message: it is missing, has no sidecar, or is damaged (its sidecar
    unreadable, of another FORMAT, or recording a normalization that cannot be used). Such a
    file is rebuilt, never read."""
    info, why, _ = _sidecar_state(path)
    return info, why


def _sidecar_state(path: Path) -> tuple[BetonInfo | None, str | None, bool]:
    """sidecar_state, and whether its sidecar is there but cut short or overwritten: the one
    reason write tells as it rebuilds the file (the others are a first write's, or an older
    release's)."""
    if not path.is_file():
        return None, "is missing", False
    try:
        info = BetonInfo(**json.loads(sidecar(path).read_text(encoding=ENCODING)))
    except FileNotFoundError:
        return None, f"has no sidecar {sidecar(path).name}", False
    except (OSError, ValueError, TypeError) as error:
        return None, f"is damaged (its sidecar {sidecar(path).name} cannot be read: {error})", True
    if info.format != FORMAT:
        return None, "is damaged (its sidecar is of another release)", False
    if not _normalizes(info):
        return None, (f"is damaged (its sidecar's normalization cannot be used: mean {info.mean}, "
                      f"std {info.std}, where it takes one finite value per RGB channel, each std "
                      f"at least {MIN_STD:.3g})"), False
    return info, None, False


def _normalizes(info: BetonInfo) -> bool:
    """Whether info's mean and std can normalize images: one finite value per RGB channel, each
    std at least MIN_STD (a smaller one was written before it was the floor)."""
    try:
        return (len(info.mean) == len(info.std) == 3
                and all(map(math.isfinite, info.mean + info.std)) and min(info.std) >= MIN_STD)
    except TypeError:  # a sidecar edited by hand: a number where a list belongs, or text
        return False


class _Rows:
    """The indexable dataset DatasetWriter asks for: (HWC uint8 image, int label) pairs."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.split.images[i], int(self.split.labels[i])


def cached(path: Path, split: Split, classes: list[str],
           stats: tuple[list[float], list[float]] | None = None,
           ) -> tuple[BetonInfo | None, str | None, bool]:
    """path's info when it holds this split as it is now (its source, classes and, when
    given, normalization) and is undamaged; else None, with why it cannot be used (None where
    it holds other data), to follow its name, and whether that is damage (an unreadable
    sidecar, other bytes than it records), which the rebuild tells."""
    old, why, damaged = _sidecar_state(path)
    if old is None:
        return None, why, damaged
    if (old.num_samples, old.source_digest, old.classes) != (
            len(split.labels), digest(split), classes) or stats not in (
            None, (old.mean, old.std)):
        return None, None, False
    why = damage(path, old)
    return (old, None, False) if why is None else (None, f"is damaged ({why})", True)


def write(path: Path, split: Split, classes: list[str],
          stats: tuple[list[float], list[float]] | None = None, workers: int = 1) -> BetonInfo:
    """Write split to path unless an up-to-date copy is there; return its sidecar info.

    stats: the normalization (mean, std) to record; None computes it from this split, and
    only when the file has to be (re)written. The file is written under a temporary name
    and renamed, so a crash or Ctrl-C never leaves a half file under the final name;
    temporaries of killed writers are swept here.
    """
    with importing_ffcv():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    old, why, damaged = cached(path, split, classes, stats)
    if old is not None:
        return old
    if damaged:  # a notice, not an error: the source is at hand, the rebuild repairs it
        log.warning(f"notice: {path} {why}; rebuilding it from its source.")
    source = digest(split)
    if len(split.labels) == 0:
        raise DataError(f"{path}: the split it would hold has no images; a .beton needs at "
                        "least one. Check the source files of this split.")
    mean, std = stats or channel_stats(split.images)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    sidecar(path).unlink(missing_ok=True)  # an old sidecar must never vouch for a new file
    check_space(path.parent, space_needed(len(split.labels), workers))
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    writer_class = guarded_writer(DatasetWriter)
    written: dict[str, object] = {}

    def write_beton(tmp: Path) -> None:
        writer_class(str(tmp), fields, num_workers=workers).from_indexed_dataset(
            _Rows(split), chunksize=1000, shuffle_indices=False)
        written.update(size=tmp.stat().st_size, file_digest=file_digest(tmp))

    try:
        atomic_write(path, write_beton)
    except (DataError, OSError) as error:  # OSError: the parent's own writes hit the disk
        raise _write_failed(path, error) from error
    info = BetonInfo(FORMAT, len(split.labels), source, classes, mean, std, **written)
    try:
        write_json(sidecar(path), asdict(info))
    except BaseException:  # a .beton nothing vouches for would only be rebuilt: drop it now
        path.unlink(missing_ok=True)
        raise
    return info


def _write_failed(path: Path, error: DataError | OSError) -> DataError:
    """The failed write of the .beton at path said with its fix: nothing was kept, so the fix
    and a rerun are all it takes."""
    why = str(error)
    if isinstance(error, OSError):  # atomic_write named `path` where it wrote the temporary
        why = error.strerror or why
        if error.filename not in (None, str(path)):
            why += f" ({error.filename})"
    free = f"free space in {path.parent} or fix the cause"  # a full disk's fix, or any other's
    return DataError(f"Writing {path} failed: {why}. Nothing was kept; "
                     f"{room_fix(error, free) or free}, then run again.")


# The .beton layout, as FFCV 1.0's writer lays it out (ffcv/types.py, ffcv/reader.py), read
# with numpy alone: importing ffcv loads numba and opencv too, time every command that only
# reads images would spend (benchmarks/results/beton-read-without-ffcv-cpu-2core.log). In
# order: a header, one descriptor per field, one metadata row per sample, the samples' bytes,
# and the allocation table, which ends the file.
VERSION = 2  # FFCV's CURRENT_VERSION: another is another layout
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                 align=True)
ALLOCATION = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# the two fields beton.write gives a file: FFCV's type id and metadata row of each
FIELDS = {"image": (2, np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                                 ("data_ptr", "<u8")])),  # RGBImageField
          "label": (1, np.dtype("<i8"))}  # IntField
RAW_MODE = 1  # RGBImageField's mode of images stored verbatim (FFCV's IMAGE_MODES["raw"])


def unreadable_beton(path: Path, what: str) -> DataError:
    """A .beton that cannot be read said with its fix: deleted, the next run writes it again."""
    return DataError(f"{path} {what}; delete it to rebuild it.")


def _sections(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The .beton at path memory-mapped, the metadata column of each field, and the allocation
    table; DataError when the file does not fit the layout."""
    def unreadable(why: str) -> DataError:
        return unreadable_beton(path, f"is not a readable .beton ({why})")

    try:  # numpy's ValueError: a file shorter than its header, descriptors or rows (or empty)
        blob = np.memmap(path, dtype=np.uint8, mode="r")
        header = np.frombuffer(blob, HEADER, count=1)[0]
        if header["version"] != VERSION:
            raise unreadable(f"file format mismatch: version {header['version']}, where "
                             f"FFCV's is {VERSION}")
        fields = np.frombuffer(blob, FIELD, count=int(header["num_fields"]),
                               offset=HEADER.itemsize)
        names = [bytes(name).rstrip(b"\0").decode(errors="replace") for name in fields["name"]]
        kinds = dict(zip(names, fields["type_id"].tolist(), strict=True))
        ours = {name: kind for name, (kind, _) in FIELDS.items()}
        if len(names) != len(FIELDS) or kinds != ours:
            raise unreadable(f"its fields and their FFCV type ids are {kinds}, where ours are "
                             f"{ours}")
        # FFCV's metadata row: each field's, in the file's order, aligned as a C struct
        row = np.dtype([(name, FIELDS[name][1]) for name in names], align=True)
        rows = np.frombuffer(blob, row, count=int(header["num_samples"]),
                             offset=HEADER.itemsize + fields.nbytes)
    except ValueError as error:
        raise unreadable(str(error)) from error
    start = int(header["alloc_table_ptr"])
    if start > len(blob):
        raise unreadable("its allocation table would start past its end")
    if (len(blob) - start) % ALLOCATION.itemsize:  # the table was cut (or grew) mid-entry
        raise unreadable_beton(path, "is truncated")
    return blob, {name: rows[name] for name in names}, blob[start:].view(ALLOCATION)


def read(path: Path, full: bool = False) -> Split:
    """All images (N x 32 x 32 x 3 uint8) and labels of a raw-image .beton, read in bulk;
    checked against its sidecar first, in `full` or by its size (see check).

    Raw RGBImageField samples are stored verbatim at each metadata row's data_ptr, so a
    memory map gives them back without FFCV (see HEADER above).
    """
    check(path, full)
    blob, columns, table = _sections(path)
    image, label = columns["image"], columns["label"]
    if (image["mode"] != RAW_MODE).any() or (image["height"] != 32).any() \
            or (image["width"] != 32).any():
        raise unreadable_beton(path, "does not hold raw 32x32 images")
    # a cut file can also leave a whole table whose images' allocations are missing from it
    if not np.isin(image["data_ptr"], table["ptr"]).all():
        raise unreadable_beton(path, "is truncated")
    # one vectorised gather: row i of the window view is the nbytes starting at byte i
    windows = np.lib.stride_tricks.sliding_window_view(blob, ROW_SIZE)
    images = windows[image["data_ptr"].astype(np.int64)].reshape(-1, 32, 32, 3)
    return Split(images, np.array(label, dtype=np.int64))  # np.array: a copy, not the map

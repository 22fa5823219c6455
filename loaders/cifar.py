"""CIFAR-10/100 and the project's own python-format folders, read and validated; `load`, the
entry point, first fetches the archive (loaders/download.py) or writes the folder
(loaders/python_folder.py) when needed, so every dataset takes the same path."""

from __future__ import annotations

import errno
import pickle
import re
import stat
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError, one_line, unplain
from common.paths import dead_link, not_a_file
from common.wording import counted, noun
from loaders import download, folders, python_folder
from loaders.layouts import LAYOUTS, OWN_LAYOUT, ROW_SIZE, Layout
from loaders.options import DATASETS, SYNTHETIC_SIZE


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x 32 x 32 x 3 (HWC, RGB) and labels as int64 N."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CifarData:
    """A dataset's class names and both splits, read and validated."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    source: Path  # the python-format folder the splits were read from


# numpy 2 renamed numpy.core to numpy._core (the old name still imports, with a warning);
# numpy 1 has no numpy._core (1.26.0) or only part of it: a pickle may name either
NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must never run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes written by Python 3 in pickle protocol 2
        # numpy integer scalars (labels saved as a list of np.int64): scalar(dtype, bytes)
        # only copies bytes into a scalar of an allowed dtype, it calls nothing
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # a batch saved as an OrderedDict: the class is called with its (key, value) pairs
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        """The allowed global (module, name) names; UnpicklingError for any other."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(re.sub(r"^numpy\._?core\b", NUMPY_CORE, module), name)


def _unpickle(path: Path, fix: str) -> dict:
    """The dict a batch or meta file holds; DataError naming path for anything else."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)  # a pipe is not opened: it would wait
        if regular:
            with open(path, "rb") as f:
                content = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as error:  # of the path or the disk; the content raises no OSError
        if error.errno in (errno.ENOENT, errno.ELOOP):  # a link to nothing, or in a loop
            raise DataError(f"{path} {dead_link(path) or 'is missing'}. {fix}") from None
        advice = (" fix the permissions of the file and its folder. Or:"
                  if error.errno in (errno.EACCES, errno.EPERM) else "")
        raise DataError(f"{path} cannot be read ({error.strerror or error});{advice} "
                        f"{fix}") from error
    except Exception as error:  # truncated files raise EOFError, garbage raises many kinds
        raise DataError(f"{path} {_what_else(path, error, fix)}") from error
    if not regular:
        raise DataError(f"{path} {not_a_file(path) or 'is not a file'}. {fix}")
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR batch dict. {fix}")
    return content


def _what_else(path: Path, error: Exception, fix: str) -> str:
    """What a file the unpickler could not read is, and its fix: what torch.save and np.save
    write, and torch tensors pickled, are written again as a CIFAR batch is; anything else
    was cut short or is no batch at all."""
    head = b""
    with suppress(OSError), open(path, "rb") as f:  # gone meanwhile: said as the rest is
        head = f.read(6)
    if head.startswith(b"PK\x03\x04"):
        return ("is a zip archive (as torch.save writes), not a pickle: write it with "
                "pickle.dump, its tensors as numpy arrays (tensor.numpy()).")
    if head == b"\x93NUMPY":
        return ("is a .npy file (as np.save writes), not a pickle: write a dict of its arrays "
                "with pickle.dump (docs/data.md).")
    if re.search(r"refusing to load torch\.", str(error)):
        return "holds torch tensors: pickle them as numpy arrays (tensor.numpy())."
    return f"is truncated or not a CIFAR python batch ({one_line(error)}). {fix}"


def _entry(content: dict, key: bytes) -> object:
    """content[key] whether the file was written by Python 2 (bytes keys, as in the original
    archive) or by Python 3 (str keys); None when neither is there."""
    return content.get(key, content.get(key.decode()))


def _one_label_each(path: Path, count: int, value: object, fix: str) -> np.ndarray:
    """A batch's labels as an integer array of `count`; DataError naming path otherwise."""
    try:
        labels = np.asarray(value)
    except ValueError:  # lists of different lengths ([[1, 2], [3], ...]) make no array
        labels = None
    if labels is not None and labels.size == 0:  # np.asarray([]) is float64; still valid
        labels = labels.astype(np.int64)
    if labels is not None and labels.shape == (count, 1):  # a column: Keras's y_train
        labels = labels[:, 0]
    if labels is None or labels.shape != (count,) or not np.issubdtype(labels.dtype,
                                                                         np.integer):
        got = ("ragged labels (lists of different lengths)" if labels is None
               else f"labels of shape {labels.shape} and type {labels.dtype}")
        raise DataError(f"{path}: {count} images but {got}; expected one integer label per "
                        f"image. {fix}")
    return labels


def _read_batch(path: Path, labels_key: bytes, num_classes: int, fix: str) -> Split:
    """One batch file as a validated Split; DataError naming path for any defect."""
    batch = _unpickle(path, fix)
    for key in (b"data", labels_key):
        if _entry(batch, key) is None:
            raise DataError(f"{path} has no '{key.decode()}' entry. {fix}")
    data = _entry(batch, b"data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        got = (f"an array of {data.dtype}" if isinstance(data, np.ndarray)
               else f"a {type(data).__name__}")
        raise DataError(f"{path}: 'data' must be a uint8 array, got {got}; pixels of 0..255 "
                        f"convert with np.asarray(data, dtype=np.uint8). {fix}")
    images = _as_hwc(path, data, fix)
    labels = _one_label_each(path, len(images), _entry(batch, labels_key), fix)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, outside "
                        f"0..{num_classes - 1} for {num_classes} classes. {fix}")
    return Split(np.ascontiguousarray(images), labels.astype(np.int64))


def _as_hwc(path: Path, data: np.ndarray, fix: str) -> np.ndarray:
    """uint8 pixels as N x 32 x 32 x 3 (HWC, what decoders and PIL expect) from the archive's
    rows of R, G and B planes (N x 3072), or from the image arrays Python 3 writers save
    (N x 3 x 32 x 32 planes, N x 32 x 32 x 3 pixels; 3 is never 32, so neither is mistaken
    for the other); DataError naming path for any other shape, or for rows that look like
    pixels flattened (_flattened_pixels)."""
    if data.ndim == 2 and data.shape[1] == ROW_SIZE:
        if _flattened_pixels(data):
            raise DataError(
                f"{path}: 'data' holds rows that look like N x 32 x 32 x 3 images flattened "
                "pixel by pixel (x.reshape(len(x), -1)), not the archive's R, G and B planes: "
                "read as planes they would be scrambled. Save the images unflattened, or as "
                f"planes: x.transpose(0, 3, 1, 2).reshape(len(x), -1). {fix}")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if data.shape[1:] == (3, 32, 32):
        return data.transpose(0, 2, 3, 1)
    if data.shape[1:] == (32, 32, 3):
        return data
    raise DataError(f"{path}: 'data' has shape {data.shape}; expected N x {ROW_SIZE} rows of R, "
                    "G and B planes (the original archive's layout), N x 3 x 32 x 32 or "
                    f"N x 32 x 32 x 3. {fix}")


# images looked at to tell planes from flattened pixels, and by how much (of a correlation's
# -1..1) the pixels' reading must be the smoother: a picture's rows are like their next ones,
# read as it was written; flattened pixels read as planes have no such rows, and noise has
# none either way (benchmarks/results/flattened-pixels-check-cpu.log: photographs' patches,
# the tests' synthetic pictures, noise, flat colours and ramps, written both ways)
FLATTENED_SAMPLE, FLATTENED_MARGIN = 256, 0.5


def _flattened_pixels(rows: np.ndarray) -> bool:
    """Whether N x 3072 rows are rather pictures flattened pixel by pixel (HWC) than the
    archive's planes: a shape cannot tell, so how alike vertically adjacent pixels are, read
    either way, in each image of a sample where both readings vary."""
    sample = rows[:FLATTENED_SAMPLE].astype(np.float32)
    as_planes = _vertical_likeness(sample.reshape(-1, 3, 32, 32))
    as_pixels = _vertical_likeness(sample.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2))
    kept = ~(np.isnan(as_planes) | np.isnan(as_pixels))
    return bool(kept.any()) and np.median(as_pixels[kept] - as_planes[kept]) > FLATTENED_MARGIN


def _vertical_likeness(planes: np.ndarray) -> np.ndarray:
    """Per image of N x 3 x 32 x 32, the mean over its planes of the correlation of each pixel
    with the one below it: near 1 for a picture, near 0 for noise; NaN where a plane is flat."""
    above, below = planes[:, :, :-1], planes[:, :, 1:]
    above = above - above.mean((2, 3), keepdims=True)
    below = below - below.mean((2, 3), keepdims=True)
    spread = np.sqrt((above ** 2).sum((2, 3)) * (below ** 2).sum((2, 3)))
    # a flat plane's spread is 0: NaN in its place, which divides without a warning
    return ((above * below).sum((2, 3)) / np.where(spread > 0, spread, np.nan)).mean(1)


def _text(name: bytes | str) -> str:
    """A class name as plain str: bytes as UTF-8, else as Latin-1 (Python 2 era files), which
    decodes any bytes, so a name in an older encoding still reads instead of failing; numpy's
    str scalars as str, which a checkpoint's weights-only load takes (it refuses numpy's)."""
    if isinstance(name, str):
        return str(name)
    try:
        return name.decode()
    except UnicodeDecodeError:
        return name.decode("latin-1")


def _class_names(meta: Path, key: bytes, fix: str) -> list[str]:
    """The class names a meta file lists under key; DataError naming it unless there are at
    least 2 distinct names (a classifier of one class has nothing to tell apart)."""
    names = _entry(_unpickle(meta, fix), key)
    if isinstance(names, np.ndarray):  # an array of names, as numpy-minded writers save them
        names = names.tolist()
    if not isinstance(names, list | tuple) or not all(isinstance(n, bytes | str) for n in names):
        found = "nothing" if names is None else f"a {type(names).__name__}"
        if isinstance(names, list | tuple):  # of what: [0, 1, ...] is no list of names
            found += " of " + ", ".join(sorted({type(n).__name__ for n in names}))
        raise DataError(f"{meta} has no '{key.decode()}' list of class names (found "
                        f"{found}). {fix}")
    classes = [_text(n) for n in names]
    if problem := unplain(classes):
        raise DataError(f"{meta} has class names that are {problem}; give each class a plain "
                        f"name (readlines() leaves a line break at each end: strip it). {fix}")
    if len(classes) < 2:
        raise DataError(f"{meta} names {counted(len(classes), 'class', 'classes')} "
                        f"({', '.join(classes)}); a classifier needs at least 2 classes. {fix}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise DataError(f"{meta} names the {noun(len(repeated), 'class', 'classes')} "
                        f"{', '.join(repeated)} more than once; each of the {len(classes)} "
                        f"labels needs its own name. {fix}")
    return classes


def read_folder(folder: Path, layout: Layout, name: str) -> CifarData:
    """Read and validate a python-format folder; any defect raises DataError naming the file."""
    if name in ("synthetic", "folder"):  # ours, made from the generator or the image folders
        fix = f"Delete {folder}; the next run makes it again."
    else:  # the archive's, or one a user wrote: deleting theirs would lose it
        fix = (f"Delete {folder} to download it again, or replace the file from the original "
               "archive; a folder you wrote yourself: write that file again as a pickled dict "
               "of numpy arrays (docs/data.md).")
    classes = _class_names(folder / layout.meta_file, layout.names_key, fix)
    if extra := sorted(set(_numbered(folder, layout.train_files)) - set(layout.train_files)):
        # a sixth batch of a folder written by hand was left out without a word
        raise DataError(f"{folder} holds {', '.join(extra)} beside "
                        f"{', '.join(layout.train_files)}, the {name} training batches read; "
                        "merge its images into those, or move it away.")

    def read(files: tuple[str, ...]) -> Split:
        parts = [_read_batch(folder / f, layout.labels_key, len(classes), fix) for f in files]
        if not sum(len(p.labels) for p in parts):
            raise DataError(f"{', '.join(str(folder / f) for f in files)} "
                            f"{noun(len(files), 'holds', 'hold')} no images: "
                            f"a split needs at least one. {fix}")
        return Split(np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]))

    return CifarData(name, classes, read(layout.train_files), read(layout.test_files), folder)


def _numbered(folder: Path, files: tuple[str, ...]) -> list[str]:
    """The files in `folder` numbered as `files` are (data_batch_<n>), any number."""
    stem = files[0].rstrip("0123456789")
    if stem == files[0]:  # not numbered (CIFAR-100's one train file)
        return []
    return [p.name for p in folder.glob(f"{stem}*") if p.name[len(stem):].isdigit()]


def source_name(name: str, data_dir: Path,
                synthetic_size: tuple[int, int] = SYNTHETIC_SIZE) -> str:
    """The name of the python-format folder dataset `name` is read from: one per synthetic
    size, one per state of an image folder, the archive's folder for CIFAR."""
    if name == "synthetic":
        return python_folder.synthetic_folder_name(*synthetic_size)
    if name == "folder":
        return python_folder.image_folder_name(data_dir, folders.class_files(data_dir))
    return LAYOUTS[name].folder


def load(name: str, data_dir: Path,
         synthetic_size: tuple[int, int] = SYNTHETIC_SIZE) -> CifarData:
    """Fetch, generate or convert (when needed), read and validate dataset `name`."""
    if name not in DATASETS:
        raise DataError(f"Unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")
    if name == "folder":
        return read_folder(python_folder.write_image_folder(data_dir), OWN_LAYOUT, name)
    data_dir.mkdir(parents=True, exist_ok=True)
    if name == "synthetic":
        folder = python_folder.write_synthetic(data_dir, *synthetic_size)
        return read_folder(folder, OWN_LAYOUT, name)
    return read_folder(download.fetch(name, data_dir), LAYOUTS[name], name)

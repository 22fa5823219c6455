"""CIFAR-10/100 on disk: download with checksum, safe extraction, validated reading; the
synthetic dataset and image folders are written in the same python format, so they take the
same path."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.files import file_hash, usual_permissions
from common.hardware import available_memory
from loaders import folders, synthetic

ROW_SIZE = 32 * 32 * 3  # one image: R, G and B planes of 32 x 32 bytes
# seconds a download's connection may stay silent (connecting, or between two reads) before
# it is given up: the whole download may take longer
DOWNLOAD_TIMEOUT = 60.0


@dataclass(frozen=True)
class Layout:
    """Where a dataset lives on the web and how its python-format folder is organised."""

    url: str | None
    md5: str | None
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: bytes
    labels_key: bytes


LAYOUTS = {
    "cifar10": Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        names_key=b"label_names",
        labels_key=b"labels",
    ),
    "cifar100": Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        names_key=b"fine_label_names",
        labels_key=b"fine_labels",
    ),
}
# the layout of the python-format folders this project writes (synthetic data, image folders):
# CIFAR-10's, so they read as CIFAR-10 does; they are made here, never downloaded
OWN_LAYOUT = replace(LAYOUTS["cifar10"], url=None, md5=None, folder="")
DATASETS = ("cifar10", "cifar100", "synthetic", "folder")


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


# --- download and extraction -------------------------------------------------------------


def md5sum(path: Path) -> str:
    """md5 of a file's bytes: what CIFAR's archives are published with."""
    return file_hash(path, hashlib.md5())


def download(url: str, md5: str, dest: Path) -> Path:
    """Fetch url to dest through a temporary file that is renamed only once its md5 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with (os.fdopen(fd, "wb") as out,
              urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response):
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise DataError(
                f"The download from {url} is corrupt: md5 {digest.hexdigest()}, expected {md5}. "
                "Nothing was kept; run again, or place the archive by hand (see below)."
            )
        usual_permissions(tmp, 0o666)
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"Could not download {url}: {reason}.") from error
    finally:
        tmp.unlink(missing_ok=True)


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar archive into target, refusing members that would land outside it."""
    root = target.resolve()
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                dest = (root / member.name).resolve()
                if not dest.is_relative_to(root) or not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"{archive} holds '{member.name}', which is a link or lies outside "
                        f"{target}; refusing to extract it. Delete the archive and download again."
                    )
            tar.extractall(target, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(
            f"{archive} is not a readable tar.gz archive ({error}). Delete it and run again."
        ) from error


def _wrong_archive(archive: Path, found: str | None, md5: str) -> str:
    """The sentence on an archive already in place whose md5 is not the expected one: without
    it, a failed download's advice to place the archive there hides that one is there."""
    if found is None:
        return ""
    return (f" The {archive} already there has md5 {found}, not {md5}: it is damaged or "
            "another file; delete it, or replace it with the original archive.")


def fetch(name: str, data_dir: Path, url: str | None = None, md5: str | None = None) -> Path:
    """Make sure data_dir holds the python-format folder of dataset `name`; return that folder.

    An existing folder is used as is. Otherwise the archive is downloaded (or reused when it
    is already there with the right md5) and extracted through a temporary folder, so an
    interruption never leaves a half-extracted folder under the final name.
    """
    layout = LAYOUTS[name]
    folder = data_dir / layout.folder
    if folder.is_dir():
        return folder
    url, md5 = url or layout.url, md5 or layout.md5
    archive = data_dir / Path(url).name
    found = md5sum(archive) if archive.is_file() else None
    try:
        if found != md5:
            download(url, md5, archive)
    except DataError as error:
        raise DataError(
            f"{error}{_wrong_archive(archive, found, md5)} To work offline, place "
            f"{Path(layout.url).name} (md5 {layout.md5}) or its extracted folder "
            f"{layout.folder}/ in {data_dir}, or use --dataset synthetic."
        ) from error
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        safe_extract(archive, staging)
        extracted = staging / layout.folder
        if not extracted.is_dir():
            raise DataError(f"{archive} does not contain {layout.folder}/. Delete it and rerun.")
        os.replace(extracted, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- reading and validation --------------------------------------------------------------


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
    }

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        """The allowed global (module, name) names; UnpicklingError for any other."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _unpickle(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path} {'is a folder, not a file' if path.is_dir() else 'is missing'}."
                        f" {fix}")
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as error:  # truncated files raise EOFError, garbage raises many kinds
        raise DataError(
            f"{path} is truncated or not a CIFAR python batch ({type(error).__name__}: "
            f"{error}). {fix}"
        ) from error
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR batch dict. {fix}")
    return content


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
    if labels is None or labels.shape != (count,) or not np.issubdtype(labels.dtype,
                                                                         np.integer):
        got = ("ragged labels (lists of different lengths)" if labels is None
               else f"labels of shape {labels.shape} and type {labels.dtype}")
        raise DataError(f"{path}: {count} images but {got}; expected one integer label per "
                        f"image. {fix}")
    return labels


def _read_batch(path: Path, labels_key: bytes, num_classes: int, fix: str) -> Split:
    batch = _unpickle(path, fix)
    for key in (b"data", labels_key):
        if _entry(batch, key) is None:
            raise DataError(f"{path} has no '{key.decode()}' entry. {fix}")
    data = _entry(batch, b"data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        raise DataError(f"{path}: 'data' must be a uint8 array, got {type(data).__name__} "
                        f"of {getattr(data, 'dtype', '?')}. {fix}")
    if data.ndim != 2 or data.shape[1] != ROW_SIZE:
        raise DataError(f"{path}: 'data' has shape {data.shape}; each row must hold "
                        f"{ROW_SIZE} values (32x32x3). {fix}")
    labels = _one_label_each(path, len(data), _entry(batch, labels_key), fix)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, outside "
                        f"0..{num_classes - 1} for {num_classes} classes. {fix}")
    # rows are channel planes (R, G, B) of 32x32; HWC is what decoders and PIL expect
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels.astype(np.int64))


def _text(name: bytes | str) -> str:
    """A class name as text: bytes as UTF-8, else as Latin-1 (Python 2 era files), which
    decodes any bytes, so a name in an older encoding still reads instead of failing."""
    if isinstance(name, str):
        return name
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
        raise DataError(f"{meta} has no '{key.decode()}' list of class names (found "
                        f"{found}). {fix}")
    classes = [_text(n) for n in names]
    if len(classes) < 2:
        raise DataError(f"{meta} names {len(classes)} class(es) ({', '.join(classes)}); a "
                        f"classifier needs at least 2 classes. {fix}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise DataError(f"{meta} names the class(es) {', '.join(repeated)} more than once; "
                        f"each of the {len(classes)} labels needs its own name. {fix}")
    return classes


def read_folder(folder: Path, layout: Layout, name: str) -> CifarData:
    """Read and validate a python-format folder; any defect raises DataError naming the file."""
    fix = (f"Delete {folder} to download it again, or replace the file from the original "
           "archive.")
    classes = _class_names(folder / layout.meta_file, layout.names_key, fix)

    def read(files: tuple[str, ...]) -> Split:
        parts = [_read_batch(folder / f, layout.labels_key, len(classes), fix) for f in files]
        if not sum(len(p.labels) for p in parts):
            raise DataError(f"{', '.join(str(folder / f) for f in files)} hold(s) no images: "
                            f"a split needs at least one. {fix}")
        return Split(np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]))

    return CifarData(name, classes, read(layout.train_files), read(layout.test_files), folder)


def source_name(name: str, data_dir: Path,
                synthetic_size: tuple[int, int] = synthetic.DEFAULT_SIZE, seed: int = 0) -> str:
    """The name of the python-format folder dataset `name` is read from: one per synthetic
    size and seed, one per state of an image folder, the archive's folder for CIFAR."""
    if name == "synthetic":
        return f"synthetic-{synthetic_size[0]}-{synthetic_size[1]}-seed{seed}"
    if name == "folder":
        return image_folder_name(folders.class_files(data_dir))
    return LAYOUTS[name].folder


def source_at_hand(name: str, folder: Path) -> bool:
    """Whether dataset `name` can be read as it is now from its python folder (see
    source_name): the folder is there. CIFAR's archive alone is not enough (extracting it
    writes, which a shared read-only folder refuses); an image folder's always is, its python
    folder's name being made from the images."""
    return name == "folder" or folder.is_dir()


def image_folder_name(files: dict[str, dict[str, list[Path]]]) -> str:
    """The python folder an ImageFolder tree converts into: one per state of its files."""
    return f"folder-{folders.fingerprint(files)}"


def load(name: str, data_dir: Path, synthetic_size: tuple[int, int] = synthetic.DEFAULT_SIZE,
         seed: int = 0) -> CifarData:
    """Fetch, generate or convert (when needed), read and validate dataset `name`."""
    if name not in DATASETS:
        raise DataError(f"Unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")
    if name == "folder":
        return read_folder(write_image_folder(data_dir), OWN_LAYOUT, name)
    data_dir.mkdir(parents=True, exist_ok=True)
    if name == "synthetic":
        folder = write_synthetic(data_dir, *synthetic_size, seed=seed)
        return read_folder(folder, OWN_LAYOUT, name)
    return read_folder(fetch(name, data_dir), LAYOUTS[name], name)


def check_synthetic_memory(n_train: int, n_test: int) -> None:
    """DataError naming --synthetic-size when the images would not fit in memory, raised
    before any is made (an allocation that fails is a traceback, one that the kernel grants
    and cannot back is a process killed by the OOM killer)."""
    # the written batches are read back and joined: two copies of the images at the peak
    needed = 2 * (n_train + n_test) * ROW_SIZE
    available = available_memory()
    if needed > available:
        raise DataError(f"--synthetic-size {n_train} {n_test} needs about {needed / 1e9:.1f} GB "
                        "of memory (twice its images: they are read back once written) but "
                        f"{available / 1e9:.1f} GB is available; choose a smaller "
                        "--synthetic-size or free some memory.")


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, **extra) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), ROW_SIZE)
    batch = {b"data": rows, OWN_LAYOUT.labels_key: labels.tolist(),
             **{k.encode(): v for k, v in extra.items()}}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)


Splits = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # train, test


def write_python_folder(folder: Path, classes: list[str], make: Callable[[], Splits]) -> Path:
    """Write the splits `make` returns ({"images", "labels", and extra arrays} each) as a
    CIFAR-10 python folder, through a staging folder renamed into place, so a crash or Ctrl-C
    while they are made or written never leaves half a folder. Extra arrays (the synthetic
    boxes) are stored under their names; readers ignore them."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        train, test = make()
        try:
            _write_splits(staging, classes, train, test)
        except OSError as error:  # a full disk names no file: say which folder, what it needs
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            needed = sum(a.nbytes for split in (train, test) for a in split.values())
            raise DataError(f"Writing {folder} failed ({error.strerror}); it needs about "
                            f"{needed / 1e6:.1f} MB in {folder.parent}. Nothing was kept; free "
                            "some space there or use a --data-dir on another disk.") from error
        usual_permissions(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_splits(staging: Path, classes: list[str], train: dict[str, np.ndarray],
                  test: dict[str, np.ndarray]) -> None:
    """The batch and meta files of a python folder, in staging."""
    files = OWN_LAYOUT.train_files
    for name, part in zip(files, np.array_split(np.arange(len(train["labels"])), len(files)),
                          strict=True):
        _write_batch(staging / name, **{k: v[part] for k, v in train.items()})
    (test_file,) = OWN_LAYOUT.test_files
    _write_batch(staging / test_file, **test)
    with open(staging / OWN_LAYOUT.meta_file, "wb") as f:
        # as file-system bytes: a folder's name that is no UTF-8 (surrogate-escaped) is kept
        # byte for byte, and read back as Latin-1 text (see _text)
        pickle.dump({OWN_LAYOUT.names_key: [os.fsencode(c) for c in classes]}, f)


def write_synthetic(data_dir: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write (once) the synthetic dataset as a CIFAR-10 python folder; return the folder."""
    if n_train < len(synthetic.CLASSES) or n_test < 1:
        raise DataError(f"Synthetic data needs at least {len(synthetic.CLASSES)} training and "
                        f"1 test image, got {n_train} and {n_test}.")
    check_synthetic_memory(n_train, n_test)  # loading a written folder needs it all the same
    folder = data_dir / source_name("synthetic", data_dir, (n_train, n_test), seed)
    if folder.is_dir():
        return folder
    def make() -> Splits:
        return tuple(dict(zip(("images", "labels", "boxes"), synthetic.make_split(n, seed=s),
                              strict=True))
                     for n, s in ((n_train, 2 * seed), (n_test, 2 * seed + 1)))

    return write_python_folder(folder, synthetic.CLASSES, make)


def write_image_folder(root: Path) -> Path:
    """Convert (once per state of its files) an ImageFolder tree into a python folder in it."""
    files = folders.class_files(root)
    folder = root / image_folder_name(files)
    if folder.is_dir():
        return folder
    def make() -> Splits:
        return tuple(dict(zip(("images", "labels"), folders.read_split(files[split]),
                              strict=True))
                     for split in folders.SPLITS)

    return write_python_folder(folder, list(files["train"]), make)

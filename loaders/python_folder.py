"""The python-format folders this project writes: the synthetic dataset and image folders
become CIFAR-10 python folders, once each, named by what they hold, so they take CIFAR-10's
path from there on."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.paths import room_fix
from common.temporaries import usual_permissions
from loaders import folders, synthetic
from loaders.layouts import LAYOUTS, OWN_LAYOUT, ROW_SIZE
from loaders.options import SYNTHETIC_CLASSES, check_synthetic_memory, synthetic_size_problem

IMAGE_FOLDER_NAME = "folder-{}"  # image_folder_name's names, of the fingerprint filled in
IMAGE_FOLDER_PATTERN = IMAGE_FOLDER_NAME.format(f"[0-9a-f]{{{2 * folders.FINGERPRINT_BYTES}}}")
# synthetic_folder_name's names, of the sizes filled in ("seed0": the name such folders have
# always had; write_synthetic draws its splits from seeds 0 and 1)
SYNTHETIC_FOLDER_NAME = "synthetic-{}-{}-seed0"


def synthetic_folder_name(n_train: int, n_test: int) -> str:
    """The python folder the synthetic dataset is written to: one per size."""
    return SYNTHETIC_FOLDER_NAME.format(n_train, n_test)


def data_options(source: str) -> str | None:
    """The --dataset option (and --synthetic-size) of the data read from the python folder
    named `source` (cifar.source_name's: a dataset's, a synthetic size's, an image folder's);
    None for a name none of them has."""
    if match := re.fullmatch(SYNTHETIC_FOLDER_NAME.format(r"(\d+)", r"(\d+)"), source):
        return f"--dataset synthetic --synthetic-size {match[1]} {match[2]}"
    if re.fullmatch(IMAGE_FOLDER_PATTERN, source):
        return "--dataset folder"
    return f"--dataset {source}" if source in LAYOUTS else None


def image_folder_name(root: Path, files: dict[str, dict[str, list[Path]]]) -> str:
    """The python folder the ImageFolder tree in `root` converts into: one per state of its
    files."""
    return IMAGE_FOLDER_NAME.format(folders.fingerprint(root, files))


def staging_prefix(folder_name: str) -> str:
    """The start of the name of the staging folder write_python_folder writes `folder_name`
    in first, beside it: preparation.sweep_stale removes what a killed writer left."""
    return f".{folder_name}-"


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, **extra) -> None:
    """One batch file as the original archive has it: rows of R, G and B planes, list labels."""
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
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(folder.name), dir=folder.parent))
    try:
        train, test = make()
        try:
            _write_splits(staging, classes, train, test)
        except OSError as error:  # a full disk (a quota, a file size limit) names no file:
            fix = room_fix(error, "free some space there or use a --data-dir on another disk")
            if fix is None:  # say which folder
                raise
            needed = sum(a.nbytes for split in (train, test) for a in split.values())
            raise DataError(f"Writing {folder} failed ({error.strerror}); it needs about "
                            f"{needed / 1e6:.1f} MB in {folder.parent}. Nothing was kept; "
                            f"{fix}.") from error
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
        # byte for byte, and read back as Latin-1 text (see _text in loaders/cifar.py)
        pickle.dump({OWN_LAYOUT.names_key: [os.fsencode(c) for c in classes]}, f)


def write_synthetic(data_dir: Path, n_train: int, n_test: int) -> Path:
    """Write (once) the synthetic dataset as a CIFAR-10 python folder; return the folder."""
    if problem := synthetic_size_problem(n_train, n_test):
        raise DataError(f"--synthetic-size {n_train} {n_test}: {problem}.")
    # loading a written folder needs the memory all the same
    check_synthetic_memory(n_train, n_test, "--synthetic-size", f"{n_train} {n_test}")
    folder = data_dir / synthetic_folder_name(n_train, n_test)
    if folder.is_dir():
        return folder
    def make() -> Splits:  # a seed of each split's own: no test image is a training image
        return tuple(dict(zip(("images", "labels", "boxes"), synthetic.make_split(n, seed=s),
                              strict=True))
                     for n, s in ((n_train, 0), (n_test, 1)))

    return write_python_folder(folder, SYNTHETIC_CLASSES, make)


def write_image_folder(root: Path) -> Path:
    """Convert (once per state of its files) an ImageFolder tree into a python folder in it."""
    files = folders.class_files(root)
    folder = root / image_folder_name(root, files)
    if folder.is_dir():
        return folder
    def make() -> Splits:
        read = folders.read_splits(files)
        return tuple(dict(zip(("images", "labels"), read[split], strict=True))
                     for split in folders.SPLITS)

    return write_python_folder(folder, list(files["train"]), make)

"""Your own images: an ImageFolder layout (DIR/train/<class>/*, DIR/test/<class>/*, the way
CINIC-10 ships) read into 32x32 RGB arrays as loaders/images.py makes them. loaders.python_folder
writes them once in the CIFAR-10 python format, so every loader, training, the report and the
bench take them unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common.errors import DataError, listing, unplain
from common.hardware import default_workers
from common.progress import track
from common.wording import counted, noun
from loaders.images import decode_image, quiet_pil

SPLITS = ("train", "test")
FINGERPRINT_BYTES = 8  # fingerprint's size; the converted folder's name holds it in hex


def _unlistable(error: OSError) -> None:
    """os.walk's onerror: a folder it cannot list (permissions, a failing disk) is a DataError."""
    raise DataError(f"{error.filename}: cannot be read ({error.strerror}); fix its permissions "
                    "or remove it.") from error


def _loops(path: Path) -> bool:
    """Whether following `path`'s links comes back around (ELOOP) rather than to nothing."""
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def images_under(folder: Path) -> list[Path]:
    """Every file in `folder` and its sub-folders (linked folders followed, as torchvision's
    ImageFolder follows them; each only once, which is ours: ImageFolder's os.walk has no
    cycle guard), sorted; hidden files and folders (.DS_Store, ...) left out (ours too). Every
    file, where ImageFolder keeps image extensions only: a stray file is then named as
    unreadable, not skipped unseen (ours). DataError for the links whose files are gone (all
    of them in one message) and for a folder that cannot be listed (os.walk skips it without a
    word): their images would be lost."""
    files, seen, gone = [], set(), []
    for top, dirs, names in os.walk(folder, onerror=_unlistable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree: walked already
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for path in (Path(top, n) for n in names if not n.startswith(".")):
            if path.is_symlink() and not path.exists():
                end = "its links loop" if _loops(path) else "which does not exist"
                gone.append(f"{path} links to {os.readlink(path)}, {end}")
            elif path.is_file():  # not a FIFO or a socket, which reading would wait on
                files.append(path)
    if gone:
        raise DataError(f"{listing(sorted(gone), 5, '; ')}; restore "
                        f"{noun(len(gone), 'it', 'them')} or delete the "
                        f"{noun(len(gone), 'link')}.")
    return sorted(files)


def class_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: files}} of an ImageFolder tree; DataError for what is missing or empty:
    a missing split at once (the layout is wrong), else every problem of both splits in one
    message, so that no problem waits for another to be fixed.

    Every file under a class folder is one of its images (images_under).
    """
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is missing: --dataset folder reads "
                            f"{root}/train/<class>/ and {root}/test/<class>/ image files (the "
                            "ImageFolder layout).")
    out, problems = {}, []
    for split in SPLITS:
        try:
            out[split] = _split_classes(root, split)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError(" ".join(problems))
    if list(out["test"]) != list(out["train"]):
        raise DataError(f"{root}/train and {root}/test hold different classes "
                        f"({', '.join(out['train'])} against {', '.join(out['test'])}); "
                        "both need the same class folders.")
    return out


def _split_classes(root: Path, split: str) -> dict[str, list[Path]]:
    """{class: files} of one split of an ImageFolder tree; DataError naming all its problems
    at once (a round of fixes each was slow on a large tree)."""
    folder = root / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()
                     and not p.name.startswith("."))
    problems, files = [], {}
    if problem := unplain(classes):
        problems.append(f"{folder} has class folders whose names are {problem}; rename them.")
    if len(classes) < 2:  # a classifier of one class has nothing to tell apart
        found = f"only the class folder {classes[0]}" if classes else "no class folders"
        problems.append(f"{folder} has {found}; a classifier needs at least 2 classes: put "
                        f"each class's images in {folder}/<class name>/.")
    for c in classes:
        try:
            files[c] = images_under(folder / c)
        except DataError as error:
            problems.append(str(error))
    empty = [str(folder / c) for c, names in files.items() if not names]
    if empty:
        problems.append(f"{', '.join(empty)}: no images in this class folder; add some or "
                        "remove the folder.")
    if problems:
        raise DataError(" ".join(problems))
    return files


def fingerprint(root: Path, files: dict[str, dict[str, list[Path]]]) -> str:
    """A hash of every image's path in `root`, size and modification time: the conversion is
    redone exactly when a file is added, removed or changed, without decoding any of them."""
    h = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    for split, classes in files.items():
        for name, paths in classes.items():
            for path in paths:
                stat = path.stat()
                within = path.relative_to(root / split / name)  # its name, in sub-folders
                # fsencode: names that are no UTF-8 come back as their bytes, not an error
                h.update(os.fsencode(f"{split}/{name}/{within}:{stat.st_size}:"
                                     f"{stat.st_mtime_ns};"))
    return h.hexdigest()


def read_splits(files: dict[str, dict[str, list[Path]]]) -> dict[str, tuple[np.ndarray,
                                                                         np.ndarray]]:
    """{split: (images N x 32 x 32 x 3, labels: index in the sorted class names)}.

    Every unreadable file of either split is collected, so one error names them all rather
    than the first, or the training split's before the test split's.
    """
    paths = [p for classes in files.values() for names in classes.values() for p in names]

    def attempt(path: Path) -> np.ndarray | DataError:
        try:
            return decode_image(path)
        except DataError as error:
            return error

    # PIL decodes without the GIL; its warnings silenced once, for every thread
    with quiet_pil(), ThreadPoolExecutor(default_workers()) as pool:
        images = list(track(pool.map(attempt, paths), len(paths), "reading images", "image"))
    bad = [str(e) for e in images if isinstance(e, DataError)]
    if bad:
        raise DataError(f"{counted(len(bad), 'file')} could not be read as images: "
                        f"{listing(bad, 3, '; ')}. Delete or replace them.")
    out, start = {}, 0
    for split, classes in files.items():
        sizes = [len(names) for names in classes.values()]
        labels = np.repeat(np.arange(len(classes)), sizes).astype(np.int64)
        out[split] = np.stack(images[start:start + sum(sizes)]), labels
        start += sum(sizes)
    return out

"""The folders a command writes into: made, and found writable, before any work; removed again
when the command fails having left them empty; a run folder's default name."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import OutputError
from common.paths import dead_link_on, in_the_way, not_a_folder, unwritable


def timestamped(prefix: str) -> str:
    """A default run folder: runs/<prefix>-<local time>."""
    return f"runs/{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def make_dir(path: Path, option: str = "--out") -> None:
    """Create folder `path` (and parents) and check it is writable.

    Called before any work, so a bad --out (or other `option`) is found in a second, not
    after an hour.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = unwritable(path)
    except OSError as error:
        if link := dead_link_on(path):  # which says its own fix
            raise OutputError(f"{option} {path}{link}.") from None
        # mkdir says only 'File exists' or 'Not a directory', naming neither file
        if (blocking := in_the_way(path)) is None:
            problem = f"cannot be written ({error.strerror})"
        elif blocking == path.absolute():
            problem = not_a_folder(blocking)
        else:
            raise OutputError(f"{option} {path}: {blocking} {not_a_folder(blocking)}; choose a "
                              "writable folder.") from None
    if problem:
        raise OutputError(f"{option} {path} {problem}; choose a writable folder.")


def missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, the deepest first."""
    missing, path = [], Path(path).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (missing_folders: the deepest first) that are empty; one that
    is not stays, and so do those above it."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def removed_on_failure(folders: list[Path]) -> Iterator[None]:
    """Remove `folders` (missing_folders: the deepest first) that are empty when the block
    fails (Ctrl-C included): a failed command leaves no folder of its own behind. Not on
    success: under torchrun another process may still be about to write there."""
    try:
        yield
    except BaseException:
        remove_empty(folders)
        raise


@contextmanager
def made_for(path: Path, option: str = "--out") -> Iterator[None]:
    """The folders missing above file or folder `path` made for the block, and removed again
    when it fails leaving them empty; OutputError naming `option` where a file stands in for
    one of them (mkdir says only 'File exists')."""
    above = Path(path).absolute().parent
    if (blocking := in_the_way(above)) is not None:
        raise OutputError(f"{option} {path}: {blocking} {not_a_folder(blocking)}; choose "
                          f"another {option}.")
    with removed_on_failure(missing_folders(above)):
        above.mkdir(parents=True, exist_ok=True)
        yield


@contextmanager
def output_dir(path: Path, option: str = "--out") -> Iterator[None]:
    """Make folder `path` for the block as make_dir does; it and the parents made for it go
    again when the block fails having left them empty."""
    with removed_on_failure(missing_folders(path)):
        make_dir(path, option)  # made, then found unwritable (a full disk): removed too
        yield

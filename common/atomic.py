"""Atomic writes of text, JSON and CSV (through links): readers and crashes only ever see the old
file or the new one; and the one-line error for a write that failed."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import OutputError, ReportError
from common.paths import DISK_FULL, FILE_SIZE_FIX, link_target, not_a_file
from common.stop_signals import stop_signals_held
from common.temporaries import temporary_name

# the encoding of every text file the commands write and read back, whatever the locale's:
# class names may be any text, and a run's files are read on other machines
ENCODING = "utf-8"


def write_failed(error: OSError, out: Path, option: str = "--out",
                 what: str = "the report") -> Exception:
    """What to raise when writing `what` into folder `out` (given as `option`) failed: a
    ReportError naming them and the fix, or `error` itself when it names a file elsewhere (an
    input)."""
    if error.errno in DISK_FULL:
        return ReportError(f"{option} {out}: its disk is full, so {what} could not be written "
                           f"(nothing was left there); free some space or choose another "
                           f"{option}.")
    if error.errno == errno.EFBIG:
        return ReportError(f"{option} {out}: {what} could not be written, as it passes this "
                           f"process's file size limit (nothing was left there); {FILE_SIZE_FIX}.")
    if error.filename is None or out.parent in Path(str(error.filename)).parents:
        return ReportError(f"{option} {out}: {what} could not be written there "
                           f"({error.strerror or error}); choose a writable {option}.")
    return error


@contextmanager
def _naming(path: Path, tmp: Path) -> Iterator[None]:
    """An OSError of the block that names no file, or names `tmp` (as a failed write() or
    os.replace(tmp, path) does), raised again naming `path`."""
    try:
        yield
    except OSError as error:
        if error.filename not in (None, str(tmp)):
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def synced(path: Path) -> None:
    """fsync a file or folder: a file renamed into place before its data reached the disk can
    be empty or cut short after a power loss or a kernel crash (on XFS, say), and a checkpoint
    so lost would take every epoch with it, not only the last."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary sibling of path, then rename it over path."""
    atomic_writes({path: write})


def unreplaceable(paths: Iterable[Path]) -> tuple[Path, str] | None:
    """The first of `paths` that a file written there would replace and that is no file (a
    folder, a pipe), with what it is instead (common.paths.not_a_file); None where there is
    none: for a caller whose message says its own fix (engine.checkpoint's, to resume)."""
    return next(((path, problem) for path in paths if (problem := not_a_file(path))), None)


def check_replaceable(paths: Iterable[Path]) -> None:
    """OutputError naming the first of `paths` that a file written there would replace and
    that is no file (a folder, a pipe): called by atomic_writes, and before hours of work by
    a command that writes its files only at the end."""
    if found := unreplaceable(paths):
        path, problem = found
        raise OutputError(f"{path} {problem}; writing it would replace that. Move it away, or "
                          "write elsewhere.")


def atomic_writes(writes: dict[Path, Callable[[Path], object]]) -> None:
    """Call write(tmp) for each path's temporary sibling and, once every one is written, rename
    them all into place: files that belong together (a table and its plot) are all as they
    were when any write fails (a full disk, an error), and all new once renamed (Ctrl-C waits
    for the renames). A rename that fails (rare: the path became a folder, the disk failed)
    leaves the files renamed before it new and the others as they were. Each file reaches the
    disk before it is renamed (synced). A path that is a symbolic link is written through
    (link_target).

    An OSError that names no file (a full disk hit by write(), not by open()) or names a
    temporary is raised again naming its path, so that the one-line error says which file
    could not be written (the temporary's name means nothing to the user)."""
    temporaries = {(target := link_target(Path(path))): temporary_name(target)
                   for path in writes}
    check_replaceable(temporaries)
    try:
        for (path, tmp), write in zip(temporaries.items(), writes.values(), strict=True):
            with _naming(path, tmp):
                write(tmp)
                synced(tmp)
        with stop_signals_held():  # a Ctrl-C between two renames left the table new, its plot old
            for path, tmp in temporaries.items():
                with _naming(path, tmp):
                    os.replace(tmp, path)
        for folder in {path.parent for path in temporaries}:
            with suppress(OSError):  # some file systems cannot sync a folder (EINVAL)
                synced(folder)  # the renames too
    finally:
        for tmp in temporaries.values():
            if os.path.lexists(tmp):  # unlink would fail on a read-only disk even with no file
                tmp.unlink()


def text_writer(text: str) -> Callable[[Path], None]:
    """A write for atomic_writes that puts `text` in its file, in ENCODING."""
    return lambda tmp: tmp.write_text(text, encoding=ENCODING)


def write_text(path: Path, text: str) -> None:
    """`text` written to `path` atomically, in ENCODING."""
    atomic_write(path, text_writer(text))


def json_text(content: dict) -> str:
    """`content` as the project's JSON files hold it: indented, one newline at the end."""
    return json.dumps(content, indent=2) + "\n"


def write_json(path: Path, content: dict) -> None:
    """`content` written to `path` atomically, as json_text gives it."""
    write_text(path, json_text(content))


def csv_text(rows: Sequence[dict], fields: Sequence[str] | None = None) -> str:
    """rows as CSV with a header: `fields`, or every row's keys in the order they first come
    (an older run's rows may lack a column added since; their cells are left empty)."""
    buffer = io.StringIO()
    header = fields or dict.fromkeys(key for row in rows for key in row)
    writer = csv.DictWriter(buffer, fieldnames=list(header), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """`rows` written to `path` atomically, as csv_text gives them."""
    write_text(path, csv_text(rows, fields))

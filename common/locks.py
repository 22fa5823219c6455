"""Locks (flocks) that die with their process: a run folder's (a second run into it is refused)
and a shared file's (a second process waits, then reuses the first one's work)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import OutputError
from common.output_folders import output_dir


def _is_current(fd: int, lock: Path) -> bool:
    """Whether descriptor fd is of the file now at path `lock` (a holder that was done may
    have removed it after it was opened)."""
    try:
        return os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        return False


def _open_lock(lock: Path) -> int:
    """The lock file opened for writing, as NFS's flock (an fcntl lock there) needs for an
    exclusive lock; read-only where another user's file (mode 0644) allows no more."""
    try:
        return os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    except PermissionError:
        return os.open(lock, os.O_RDONLY)


def _acquire(lock: Path, on_busy: Callable[[int], object]) -> int:
    """An open descriptor of `lock`, flocked by this process. When another process holds it,
    on_busy(fd) is called once: it raises to refuse, or returns to wait for the holder.

    A holder unlinks the file when done, so after locking, check that the file locked is
    still the one at that path (the usual pattern): else another process released it meanwhile.
    """
    waited = False
    while True:
        fd = _open_lock(lock)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    on_busy(fd)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_current(fd, lock):
                return fd
        except BaseException:  # refused, or Ctrl-C while waiting: nothing held
            os.close(fd)
            raise
        os.close(fd)


def _busy_run(folder: Path) -> Callable[[int], None]:
    """locked_dir's answer to a held lock: refuse, naming the run that holds it."""
    def refuse(fd: int) -> None:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise OutputError(f"{folder} is in use by another run (process {holder}); wait for it "
                          "to finish, or use another --out.")
    return refuse


@contextmanager
def locked_dir(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on folder `path` (made if needed) while the block runs.

    A second run into the same folder is refused instead of overwriting the first one's
    files. The lock is an flock on `path/.lock`, which dies with its process, so a killed run
    never leaves the folder locked; the file is removed on the way out. A folder this call
    created is removed again if the block fails having written nothing into it.
    """
    path = Path(path)
    with output_dir(path):
        lock = path / ".lock"
        fd = _acquire(lock, _busy_run(path))
        try:
            with suppress(OSError):  # another user's lock file, open read-only, keeps its text
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            with suppress(OSError):  # a folder made read-only meanwhile: the flock dies anyway
                lock.unlink(missing_ok=True)
            os.close(fd)


@contextmanager
def waiting_lock(lock: Path, on_wait: Callable[[], object]) -> Iterator[None]:
    """Hold an exclusive flock on file `lock` while the block runs, waiting while another
    process holds it: for work a second process can reuse once the first is done, where
    locked_dir refuses. The flock dies with its process, so a killed holder never blocks
    anyone; the file is removed on the way out."""
    fd = _acquire(Path(lock), lambda fd: on_wait())
    try:
        yield
    finally:
        # another user's lock file in a sticky folder (/tmp, /scratch) is theirs to remove
        with suppress(OSError):
            Path(lock).unlink(missing_ok=True)
        os.close(fd)

"""Files and folders the tools write: atomic writes (readers and crashes only ever see the old
file or the new one), the run folder's lock, writability checks and permissions."""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import OutputError, ReportError


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling `.<name>.<pid>.<kind>` a write goes to first (kind "tmp"), or an old
    file waits in before it is removed; temporary_writer reads the pid back."""
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def temporary_writer(entry: Path, path: Path, kinds: tuple[str, ...] = ("tmp",)) -> int | None:
    """The pid of the process that made `entry`, when entry is a temporary_name of `path` of
    one of `kinds`; else None."""
    prefix = f".{path.name}."
    pid, _, kind = entry.name.removeprefix(prefix).partition(".")
    if entry.name.startswith(prefix) and kind in kinds and pid.isdigit():
        return int(pid)
    return None


def writer_alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's too: signalling it is refused, not failed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_writers(out: Path) -> None:
    """Remove the `.<name>.<pid>.tmp` and `.old` folders that writers into `out` left when
    killed (SIGKILL, a power cut): of dead writers, or of this PID, reused after a restart.
    Nothing else ever removes them, and each can hold a whole report."""
    for entry in out.parent.iterdir():
        pid = temporary_writer(entry, out, ("tmp", "old"))
        if pid is not None and (pid == os.getpid() or not writer_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def write_failed(error: OSError, out: Path, option: str = "--out",
                 what: str = "the report") -> Exception:
    """What to raise when writing `what` into folder `out` (given as `option`) failed: a
    ReportError naming them and the fix, or `error` itself when it names a file elsewhere (an
    input)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ReportError(f"{option} {out}: its disk is full, so {what} could not be written "
                           f"(nothing was left there); free some space or choose another "
                           f"{option}.")
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


def not_a_file(path: Path) -> str | None:
    """Why `path` is no file to read, nor one a write may replace ('is a folder', 'is a
    device, pipe or socket'), or None where there is a file or nothing. Read, a pipe with no
    writer waits forever; renamed over, /dev/null would become a plain file for the whole
    machine. A path that cannot even be looked at (a name too long) is None: the read or
    write, or place_problem, says why."""
    with suppress(OSError):
        if path.is_dir():
            return "is a folder"
        if path.exists() and not path.is_file():
            return "is a device, pipe or socket, not a file"
    return None


def resolved(path: Path, option: str) -> Path:
    """path.resolve(), or OutputError naming `option` where its links loop (resolve raises
    RuntimeError for that up to Python 3.12, OSError from 3.13)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        raise OutputError(f"{option} {path} cannot be followed ({error}); point its links at "
                          "a file or folder, or choose another path.") from None


def link_target(path: Path) -> Path:
    """The file a write to `path` lands in: where path is a symbolic link, the file it leads to,
    as open() and cp write through links (a temporary renamed over the link would replace the
    link itself with a plain file). OutputError where the link leads nowhere, as cp refuses to
    write through a dangling link."""
    if not os.path.islink(path):
        return path
    if problem := dead_link(path):
        raise OutputError(f"{path} {problem}.")
    return Path(os.path.realpath(path))


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


def check_replaceable(paths: Iterable[Path]) -> None:
    """OutputError naming the first of `paths` that a file written there would replace and
    that is no file (a folder, a pipe): called by atomic_writes, and before hours of work by
    a command that writes its files only at the end."""
    for path in paths:
        if problem := not_a_file(path):
            raise OutputError(f"{path} {problem}; writing it would replace that. Move it away, "
                              "or write elsewhere.")


def atomic_writes(writes: dict[Path, Callable[[Path], object]]) -> None:
    """Call write(tmp) for each path's temporary sibling and, once every one is written, rename
    them all into place: files that belong together (a table and its plot) are all as they
    were when any write fails (a full disk, an error), and all new once renamed. A rename that
    fails (rare: the path became a folder, the disk failed) leaves the files renamed before it
    new and the others as they were. Each file reaches the disk before it is renamed (synced).
    A path that is a symbolic link is written through (link_target).

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


def file_hash(path: Path, digest: hashlib._Hash) -> str:
    """The hex digest of a file's bytes, fed to `digest` (a fresh hashlib object) in 4 MB
    blocks, so a large file is never held in memory."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def json_text(content: dict) -> str:
    return json.dumps(content, indent=2) + "\n"


def write_json(path: Path, content: dict) -> None:
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
    write_text(path, csv_text(rows, fields))


def usual_permissions(path: Path, mode: int = 0o777) -> None:
    """Give a file or folder made by tempfile (0600/0700) the mode open() and mkdir() would."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def timestamped(prefix: str) -> str:
    """A default run folder: runs/<prefix>-<local time>."""
    return f"runs/{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def unwritable(folder: Path) -> str | None:
    """Why no file can be made in existing `folder` ('cannot be written (Permission denied)'),
    or None. Trying is the only sure test: os.access misses read-only mounts, ACLs and root;
    and a byte is written, since an empty file is made on a disk with no space left."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:  # unlinked at once: nothing is left
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())  # where space is taken at write-back, it is taken here
    except OSError as error:
        return f"cannot be written ({error.strerror or error})"
    return None


def place_problem(path: Path, folders_made: bool = False) -> str | None:
    """Why no file can be written at `path`, or None: checked before the work it records,
    not after an hour of it. With folders_made (the writer makes them), the nearest folder
    of path that exists is the one that must be writable."""
    folder = path.absolute().parent
    if folders_made:
        folder = nearest_existing(folder)
    if not folder.is_dir():
        return f"{folder} is a file, not a folder" if folder.exists() else f"{folder} is missing"
    problem = long_name(path)
    if problem is None and (problem := unwritable(folder)):
        problem = f"{folder} {problem}"
    return problem


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists (/ always does)."""
    return next(p for p in (path, *path.parents) if p.exists())


def long_name(path: Path) -> str | None:
    """Why `path` is too long a name for its temporary_name, which a write (or a report's
    folder, made whole) goes to first, a few bytes longer: the name fits, its temporary would
    not ('File name too long'); None when it fits."""
    folder = nearest_existing(Path(path).absolute().parent)  # made by the writer, if missing
    longest, limit = len(os.fsencode(temporary_name(path).name)), os.pathconf(folder,
                                                                              "PC_NAME_MAX")
    if longest > limit:
        return (f"its name is too long ({len(os.fsencode(path.name))} bytes; this file system "
                f"takes {limit}, less {longest - len(os.fsencode(path.name))} for the "
                "temporary it is written as first)")
    return None


def dead_link(path: Path | str) -> str | None:
    """Why `path` cannot be followed where it is a symbolic link that leads nowhere (its
    links loop, or end at a missing path's parent), or None: mkdir and open then say only
    'File exists' or 'No such file'."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"is a symbolic link that cannot be followed (to {os.readlink(path)}: its links "
                "loop or lead nowhere); point it at a path that exists, or remove it")
    return None


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
        problem = ("is a file, not a folder" if path.is_file() else dead_link(path)
                   or f"cannot be written ({error.strerror})")
    if problem:
        raise OutputError(f"{option} {path} {problem}; choose a writable folder.")


def mount_point(path: Path) -> bool:
    """Whether `path` is a mount point, which no rename may replace: os.path.ismount, and the
    mount table for a bind mount of the same disk, which ismount cannot tell from a folder."""
    if os.path.ismount(path):
        return True
    try:  # field 5 of each line is a mount point, its spaces and the like escaped in octal
        with open("/proc/self/mountinfo", "rb") as table:
            points = {fields[4] for fields in map(bytes.split, table) if len(fields) > 4}
    except OSError:  # not Linux
        return False
    escaped = os.fsencode(Path(path).resolve())
    for char in b"\\ \t\n":
        escaped = escaped.replace(bytes([char]), b"\\%03o" % char)
    return escaped in points


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
    made = missing_folders(above)
    nearest = made[-1].parent if made else above  # the first that exists: / always does
    if not nearest.is_dir():
        raise OutputError(f"{option} {path}: {nearest} is a file, not a folder; choose another "
                          f"{option}.")
    with removed_on_failure(made):
        above.mkdir(parents=True, exist_ok=True)
        yield


@contextmanager
def output_dir(path: Path, option: str = "--out") -> Iterator[None]:
    """Make folder `path` for the block as make_dir does; it and the parents made for it go
    again when the block fails having left them empty."""
    with removed_on_failure(missing_folders(path)):
        make_dir(path, option)  # made, then found unwritable (a full disk): removed too
        yield


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
            lock.unlink(missing_ok=True)
            os.close(fd)


def sweep_temporaries(folder: Path, name: str = "*") -> None:
    """Delete the `.<name>.<pid>.tmp` files (of every name by default) that writers killed
    mid-write left in folder."""
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


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

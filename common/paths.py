"""What stands at a path and whether a file can be written there: a folder or a pipe where a
file should be, a link that leads nowhere, a name too long, a folder that cannot be written;
checked before the work, not after an hour of it."""

from __future__ import annotations

import errno
import os
import re
import resource
import tempfile
import zipfile
from contextlib import suppress
from pathlib import Path

from common.errors import OutputError
from common.temporaries import temporary_name

CHECKPOINT_FORMAT = "cifar10-engine/ckpt"  # the marker of a checkpoint (engine.checkpoint.FORMAT)
# the fix for a write that passed RLIMIT_FSIZE (EFBIG, or torch's zip writer's RuntimeError)
FILE_SIZE_FIX = "raise this process's file size limit (`ulimit -f unlimited`)"
# a write's errors whose fix is free space: a full disk, or the user's quota on it used up
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def room_fix(error: Exception, free: str) -> str | None:
    """The fix for a write that failed for want of room: FILE_SIZE_FIX past this process's
    file size limit (EFBIG: no free space would help), `free` on a full disk or quota; None
    for any other error."""
    if isinstance(error, OSError):
        code = error.errno
    else:  # another process's OSError relayed as its message (FFCV's writer workers'), so
        # the errno it quotes: "[Errno 27] File too large"
        quoted = re.search(r"\[Errno (\d+)\]", str(error))
        code = int(quoted[1]) if quoted else None
    if code == errno.EFBIG:
        return FILE_SIZE_FIX
    return free if code in DISK_FULL else None


def file_size_limited() -> bool:
    """Whether this process may write files only up to a size (ulimit -f): a write past it
    fails with EFBIG ('File too large'), which no free space on the disk would fix."""
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


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


def no_file_to_read(path: Path) -> str | None:
    """Why there is no file to read at `path` although something is there: not_a_file's
    reason, or dead_link's; None where nothing is (each caller says 'does not exist' its way)."""
    return not_a_file(path) or dead_link(path)


def resolved(path: Path, option: str) -> Path:
    """path.resolve(), or OutputError naming `option` where it or a folder above it is a link
    that cannot be followed: its links loop (resolve raised RuntimeError up to Python 3.12) or
    it leads nowhere (resolve would follow it there, and the folders made for the path would
    be made where it points, where `mkdir -p` refuses)."""
    if problem := dead_link_on(path):
        raise OutputError(f"{option} {path}{problem}.")
    return path.resolve()


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


def in_the_way(path: Path) -> Path | None:
    """What stands where folder `path` or the nearest of the folders above it that exists
    belongs, when that is no folder (a file, a device); None when it is one."""
    nearest = nearest_existing(Path(path).absolute())
    return None if nearest.is_dir() else nearest


def not_a_folder(path: Path) -> str:
    """What `path`, which exists and is no folder, is instead, for a message."""
    return f"is {'a file' if path.is_file() else 'a device, pipe or socket'}, not a folder"


def place_problem(path: Path, folders_made: bool = False) -> str | None:
    """Why no file can be written at `path`, or None: checked before the work it records,
    not after an hour of it. With folders_made (the writer makes them), the nearest folder
    of path that exists is the one that must be writable."""
    folder = path.absolute().parent
    if folders_made:
        folder = nearest_existing(folder)
    if not folder.is_dir():
        return f"{folder} {not_a_folder(folder)}" if folder.exists() else f"{folder} is missing"
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


def holds_checkpoint(path: Path) -> bool:
    """Whether `path` is a cifar10-engine checkpoint: torch's zip whose pickle holds the format
    marker. Cheap (no tensor is read), safe for any file (nothing is unpickled) and free of
    torch, so an option can be checked before torch loads: an output written over a
    checkpoint loses a run that can no longer be resumed, evaluated or exported."""
    marker = CHECKPOINT_FORMAT.encode()
    try:
        with zipfile.ZipFile(path) as archive:
            return any(marker in archive.read(name) for name in archive.namelist()
                       if name.rpartition("/")[2] == "data.pkl")
    except (OSError, zipfile.BadZipFile):
        return False


def dead_link(path: Path | str) -> str | None:
    """Why `path` cannot be followed where it is a symbolic link that leads nowhere (its
    links loop, or end at a missing path's parent), or None: mkdir and open then say only
    'File exists' or 'No such file'."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"is a symbolic link that cannot be followed (to {os.readlink(path)}: its links "
                "loop or lead nowhere); point it at a path that exists, or remove it")
    return None


def dead_link_on(path: Path) -> str | None:
    """What to say after `path` where it or a folder above it is a link that leads nowhere
    (dead_link): ' is a symbolic link ...', or ': <the link above> is a symbolic link ...';
    else None."""
    for link in (path, *path.parents):
        if problem := dead_link(link):
            return f" {problem}" if link == path else f": {link} {problem}"
    return None


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

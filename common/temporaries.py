"""The hidden temporaries a write goes to first (`.<name>.<pid>.tmp`), the sweep of those that
killed writers left behind, and the usual mode for what tempfile made (0600/0700)."""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling `.<name>.<pid>.<kind>` a write goes to first (kind "tmp"), or an old
    file waits in before it is removed; temporary_writer reads the pid back."""
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def _parsed(entry: Path) -> tuple[str, int, str] | None:
    """(name, pid, kind) of a temporary_name, `.<name>.<pid>.<kind>`; None for another name."""
    match = re.fullmatch(r"\.(.+)\.(\d+)\.([a-z]+)", entry.name)
    return (match[1], int(match[2]), match[3]) if match else None


def temporary_writer(entry: Path, path: Path, kinds: tuple[str, ...] = ("tmp",)) -> int | None:
    """The pid of the process that made `entry`, when entry is a temporary_name of `path` of
    one of `kinds`; else None."""
    parsed = _parsed(entry)
    if parsed is not None and parsed[0] == path.name and parsed[2] in kinds:
        return parsed[1]
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


def gone_writer(pid: int) -> bool:
    """Whether a temporary of writer `pid` was left behind: its process is dead, or is this
    one (the pid reused after a restart; this process writes none while it sweeps)."""
    return pid == os.getpid() or not writer_alive(pid)


def sweep_dead_writers(out: Path) -> None:
    """Remove the `.<name>.<pid>.tmp` and `.old` folders that writers into `out` left when
    killed (SIGKILL, a power cut). Nothing else ever removes them, and each can hold a whole
    report."""
    for entry in out.parent.iterdir():
        pid = temporary_writer(entry, out, ("tmp", "old"))
        if pid is not None and gone_writer(pid):
            shutil.rmtree(entry, ignore_errors=True)


def sweep_temporaries(folder: Path, name: str = "*") -> None:
    """Delete the `.<name>.<pid>.tmp` files (of every name by default) that writers killed
    mid-write left in folder; a live writer's is a write under way (tools/export.py's beside
    the checkpoints while the run resumes), kept."""
    for stale in Path(folder).glob(f".{name if name == '*' else glob.escape(name)}.*.tmp"):
        parsed = _parsed(stale)
        if parsed is not None and gone_writer(parsed[1]) and stale.is_file():
            stale.unlink(missing_ok=True)


def usual_permissions(path: Path, mode: int = 0o777) -> None:
    """Give a file or folder made by tempfile (0600/0700) the mode open() and mkdir() would."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    os.chmod(path, mode & ~umask)

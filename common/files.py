"""Atomic file writes: readers and crashes only ever see the old file or the new one."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The hidden sibling a write goes to first; `.<name>.*.tmp` finds those of dead writers."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary sibling of path, then rename it over path."""
    tmp = temporary_name(Path(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, content: dict) -> None:
    write_text(path, json.dumps(content, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """rows as CSV with a header: `fields`, or the keys of the first row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields or (rows[0] if rows else [])))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def timestamped(prefix: str) -> str:
    """A default run folder: runs/<prefix>-<local time>."""
    return f"runs/{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"

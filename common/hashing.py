"""A file's content hash, read in blocks: a download's md5, a .beton's file hash (its sidecar's
file_digest)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: Path, digest: hashlib._Hash) -> str:
    """The hex digest of a file's bytes, fed to `digest` (a fresh hashlib object) in 4 MB
    blocks, so a large file is never held in memory."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

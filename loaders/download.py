"""A CIFAR archive fetched into a data folder: downloaded through a temporary file kept only
when its md5 matches, and extracted safely (nothing outside the target, no links)."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from common.errors import DataError, one_line
from common.hashing import file_hash
from common.paths import room_fix
from common.temporaries import usual_permissions
from loaders.layouts import LAYOUTS

# seconds a download's connection may stay silent (connecting, or between two reads) before
# it is given up: the whole download may take longer
DOWNLOAD_TIMEOUT = 60.0
# what a download is written under first, beside the archive (.<archive>.<random>.part), and
# what an archive is extracted in (.extract-<random>): preparation.sweep_stale removes what a
# writer killed outright left of them
PART_SUFFIX = ".part"
EXTRACT_PREFIX = ".extract-"


class Unfetched(DataError):
    """A download that failed (the network, the server, a corrupt reply; not the disk):
    `failure` says why, and `place` (fetch's) how to do without the network; the message adds
    a new run's other way, --dataset synthetic. A resumed run, whose dataset cannot change,
    says its own (engine.resume)."""

    def __init__(self, failure: str, place: str = "") -> None:
        offline = f" To work offline, {place}, or use --dataset synthetic." if place else ""
        super().__init__(failure + offline)
        self.failure, self.place = failure, place


def part_prefix(archive: str) -> str:
    """The start of the name a download of the file named `archive` is written under first."""
    return f".{archive}."


def md5sum(path: Path) -> str:
    """md5 of a file's bytes: what CIFAR's archives are published with."""
    return file_hash(path, hashlib.md5())


def download(url: str, md5: str, dest: Path) -> Path:
    """Fetch url to dest through a temporary file that is renamed only once its md5 matches.

    A failed download is an Unfetched, to which fetch adds what to do offline; a full disk is
    a DataError of its own, where placing the archive by hand would fail the same way.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=part_prefix(dest.name), suffix=PART_SUFFIX,
                                    dir=dest.parent)
    tmp = Path(tmp_name)
    size = None  # the archive's bytes, when the server gives them (Content-Length)
    try:
        digest = hashlib.md5()
        with (os.fdopen(fd, "wb") as out,
              urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response):
            size = response.length
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise Unfetched(
                f"The download from {url} is corrupt: md5 {digest.hexdigest()}, expected {md5}. "
                "Nothing was kept; run again, or place the archive by hand (see below)."
            )
        usual_permissions(tmp, 0o666)
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        # the disk or a limit, not the network
        if fix := room_fix(error, "free some space, or pass another --data-dir"):
            # the size the server gave; else at least what was written before the write failed
            needed = (f"{size / 1e6:,.1f} MB" if size else
                      f"over {tmp.stat().st_size / 1e6:,.1f} MB")
            raise DataError(
                f"cannot download {url} into {dest.parent}: {error.strerror}. The archive "
                f"needs {needed} there, and extracting it about as much again: {fix}."
            ) from error
        reason = getattr(error, "reason", error)
        raise Unfetched(f"Could not download {url}: {reason}.") from error
    except http.client.HTTPException as error:  # a reply cut short or garbled: no OSError
        raise Unfetched(f"Could not download {url}: the server's reply was cut short or "
                        f"malformed ({one_line(error)}).") from error
    finally:
        tmp.unlink(missing_ok=True)


# the "data" filter (no devices, links out, absolute paths, unsafe modes) where tarfile has it:
# Python 3.10.12+, 3.11.4+ and 3.12; before, safe_extract's own member checks (below) alone
EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar archive into target, refusing members that would land outside it. A
    damaged archive and a folder that cannot take its files are told apart: deleting a good
    archive would not help with a full disk."""
    root, size = target.resolve(), 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                dest = (root / member.name).resolve()
                if not dest.is_relative_to(root) or not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"{archive} holds '{member.name}', which is a link or lies outside "
                        f"{target}; refusing to extract it. Delete the archive and download again."
                    )
                size += member.size
            tar.extractall(target, **EXTRACT_FILTER)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:  # the disk, not the data
            raise DataError(f"cannot extract {archive} into {target.parent}: "
                            f"{error.strerror}. It needs {size / 1e6:,.0f} MB there: free some "
                            "space, or pass another --data-dir.") from error
        # damaged data: tarfile's ReadError (zlib's errors in a header among them), gzip's
        # BadGzipFile (an OSError without an errno), EOFError for an archive cut short, and
        # zlib's own error in a member's data, which extractall lets through
        raise DataError(
            f"{archive} is not a readable tar.gz archive ({error}). Delete it and run again."
        ) from error


def _wrong_archive(archive: Path, found: str | None, md5: str) -> str:
    """The sentence on an archive already in place whose md5 is not the expected one: without
    it, a failed download's advice to place the archive there hides that one is there."""
    if found is None:
        return ""
    return (f" The {archive} already there has md5 {found}, not {md5}: it is damaged or "
            "another file; delete it, or replace it with the original archive.")


def fetch(name: str, data_dir: Path, url: str | None = None, md5: str | None = None) -> Path:
    """Make sure data_dir holds the python-format folder of dataset `name`; return that folder.

    An existing folder is used as is. Otherwise the archive is downloaded (or reused when it
    is already there with the right md5) and extracted through a temporary folder, so an
    interruption never leaves a half-extracted folder under the final name.
    """
    layout = LAYOUTS[name]
    folder = data_dir / layout.folder
    if folder.is_dir():
        return folder
    holds_batches = all((data_dir / f).is_file()
                        for f in (layout.meta_file, layout.train_files[0]))
    if holds_batches or data_dir.name == layout.folder:
        # the python folder itself was named: a download would go into it, 170 MB for nothing
        # online, and offline the advice to place the folder there read as a riddle (an empty
        # one, too: its batch files not yet in place)
        where = (f"pass --data-dir {data_dir.parent}" if data_dir.name == layout.folder
                 else f"move them into {folder}/")
        what = (f"holds {name}'s batch files themselves ({layout.meta_file}, "
                f"{layout.train_files[0]}, ...)" if holds_batches
                else f"is {name}'s python folder itself, {layout.folder}/")
        raise DataError(f"--data-dir {data_dir} {what}, where it names the folder that holds "
                        f"{layout.folder}/: {where}.")
    url, md5 = url or layout.url, md5 or layout.md5
    archive = data_dir / Path(url).name
    found = md5sum(archive) if archive.is_file() else None
    if found != md5:
        try:
            download(url, md5, archive)
        except Unfetched as error:  # what to do offline, said where the data folder is known
            raise Unfetched(error.failure + _wrong_archive(archive, found, md5),
                            f"place {Path(layout.url).name} (md5 {layout.md5}) or its extracted "
                            f"folder {layout.folder}/ in {data_dir}") from error
    staging = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=data_dir))
    try:
        safe_extract(archive, staging)
        extracted = staging / layout.folder
        if not extracted.is_dir():
            raise DataError(f"{archive} does not contain {layout.folder}/. Delete it and rerun.")
        os.replace(extracted, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

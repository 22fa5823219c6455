"""CIFAR download (against a local HTTP server), validation of python-format folders, and the
synthetic dataset."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CIFAR10_CLASSES,
    ROOT,
    Cifar10Dir,
    dump_pickle,
    in_process,
    make_tar_gz,
    random_split,
    run_script,
    sidecar_info,
    synthetic_boxes,
    tmpfs,
    to_rows,
    without_root_powers,
    write_batch,
    write_cifar10,
)

from common import hardware
from common.errors import OutputError, SetupError, plain_line
from common.locks import waiting_lock
from common.output_folders import output_dir
from loaders import beton, cifar, download, layouts, python_folder, synthetic
from loaders.cifar import DataError
from loaders.options import DATASETS, SYNTHETIC_CLASSES
from loaders.preparation import prepare

LAYOUT = layouts.LAYOUTS["cifar10"]
ARCHIVE = "cifar-10-python.tar.gz"


def read(folder: Path) -> cifar.CifarData:
    return cifar.read_folder(folder, LAYOUT, "cifar10")


def assert_splits_equal(got: cifar.Split, want: cifar.Split) -> None:
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- download ------------------------------------------------------------------------------


@pytest.fixture
def served_archive(tmp_path, http_server):
    """A CIFAR-10 archive on the local server: (what it holds, its url, its md5)."""
    made = write_cifar10(tmp_path / "made")
    archive = make_tar_gz(http_server.root / ARCHIVE, made.folder)
    return made, f"{http_server.url}/{ARCHIVE}", md5(archive)


def test_fetch_downloads_checks_and_extracts(tmp_path, served_archive):
    made, url, digest = served_archive
    data_dir = tmp_path / "data"
    folder = download.fetch("cifar10", data_dir, url=url, md5=digest)
    assert folder == data_dir / LAYOUT.folder
    data = read(folder)
    assert_splits_equal(data.train, made.train)
    assert_splits_equal(data.test, made.test)
    # the verified archive is kept for reuse; no temporaries are left
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([ARCHIVE, LAYOUT.folder])


def test_fetch_uses_an_existing_folder_without_downloading(cifar10_dir, closed_port):
    url = f"http://127.0.0.1:{closed_port}/{ARCHIVE}"
    assert download.fetch("cifar10", cifar10_dir.data_dir, url=url, md5="0" * 32) == \
        cifar10_dir.folder


@pytest.mark.parametrize("renamed", [False, True], ids=["as extracted", "renamed"])
def test_a_data_dir_that_is_the_python_folder_itself_is_named(tmp_path, closed_port, renamed):
    """--data-dir data/cifar-10-batches-py (the folder, not the one holding it) went on to
    download the archive into it, and offline said to place the folder in itself."""
    made = write_cifar10(tmp_path / "data")
    folder = made.folder.rename(tmp_path / "data" / "cifar10") if renamed else made.folder
    where = (f"move them into {folder / LAYOUT.folder}/" if renamed
             else f"pass --data-dir {made.data_dir}")
    with pytest.raises(DataError) as refused:
        download.fetch("cifar10", folder, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}")
    assert str(refused.value) == (
        f"--data-dir {folder} holds cifar10's batch files themselves (batches.meta, "
        f"data_batch_1, ...), where it names the folder that holds {LAYOUT.folder}/: {where}.")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*LAYOUT.train_files, *LAYOUT.test_files, LAYOUT.meta_file])  # nothing written


def test_a_data_dir_named_as_the_python_folder_is_refused_before_its_batch_files_are_in(
        tmp_path, closed_port):
    """An empty --data-dir data/cifar-10-batches-py was downloaded into, and offline the error
    said to place cifar-10-batches-py/ in data/cifar-10-batches-py."""
    folder = tmp_path / "data" / LAYOUT.folder
    folder.mkdir(parents=True)
    with pytest.raises(DataError) as refused:
        download.fetch("cifar10", folder, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}")
    assert str(refused.value) == (
        f"--data-dir {folder} is cifar10's python folder itself, {LAYOUT.folder}/, where it "
        f"names the folder that holds {LAYOUT.folder}/: pass --data-dir {folder.parent}.")
    assert not any(folder.iterdir())  # nothing written


def test_download_keeps_the_file_only_when_its_md5_matches(tmp_path, served_archive):
    _, url, digest = served_archive
    dest = download.download(url, digest, tmp_path / "data" / "ok.tar.gz")
    assert md5(dest) == digest
    with pytest.raises(DataError, match="corrupt"):
        download.download(url, "0" * 32, tmp_path / "data" / "bad.tar.gz")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["ok.tar.gz"]


def test_a_files_hash_covers_every_block_of_a_file_larger_than_one(tmp_path):
    """file_hash reads 4 MB blocks: CIFAR-10's 170 MB archive is dozens of them, and a change
    past the first block (a damaged download, a .beton's later images) must change the hash."""
    path = tmp_path / "archive.tar.gz"
    content = bytearray(os.urandom(9 << 20))  # two whole blocks and part of a third
    path.write_bytes(content)
    assert download.md5sum(path) == hashlib.md5(content).hexdigest()
    content[-1] ^= 1
    path.write_bytes(content)
    assert download.md5sum(path) == hashlib.md5(content).hexdigest()
    assert beton.file_digest(path) == hashlib.blake2b(content, digest_size=16).hexdigest()


def test_fetch_with_wrong_md5_raises_and_leaves_nothing(tmp_path, served_archive):
    _, url, _ = served_archive
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        download.fetch("cifar10", data_dir, url=url, md5="0" * 32)
    assert url in str(error.value) and "md5" in str(error.value)
    # a proxy or portal that alters every download: the offline way is the one left
    assert str(error.value).endswith(f"in {data_dir}, or use --dataset synthetic.")
    assert list(data_dir.iterdir()) == []  # no archive, no .part, no .extract- folder


@pytest.mark.parametrize("where, reason", [
    ("closed port", "[Errno 111] Connection refused"), ("missing file", "File not found"),
])
def test_fetch_unreachable_names_url_manual_file_and_synthetic(tmp_path, http_server,
                                                               closed_port, where, reason):
    base = f"http://127.0.0.1:{closed_port}" if where == "closed port" else http_server.url
    url = f"{base}/{ARCHIVE}"
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        download.fetch("cifar10", data_dir, url=url, md5="0" * 32)
    message = str(error.value)
    # the cause itself, not urllib's wrapping of it ("<urlopen error ...>")
    assert message.startswith(f"Could not download {url}: {reason}. To work offline, place ")
    assert "already there" not in message  # no archive was there to be damaged
    assert ARCHIVE in message and LAYOUT.md5 in message and str(data_dir) in message
    assert "--dataset synthetic" in message
    assert list(data_dir.iterdir()) == []


def test_fetch_names_a_placed_archive_whose_md5_is_wrong(tmp_path, closed_port):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / ARCHIVE
    archive.write_bytes(os.urandom(100_000))  # a cut or foreign file the user put there
    found = md5(archive)
    with pytest.raises(DataError) as error:
        download.fetch("cifar10", data_dir, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}")
    message = str(error.value)
    assert f"{archive} already there has md5 {found}, not {LAYOUT.md5}" in message
    assert "delete it, or replace it" in message and "--dataset synthetic" in message
    assert md5(archive) == found  # the user's file is theirs to delete


class _RawReply(BaseHTTPRequestHandler):
    """Answers every GET with the bytes of its `reply` as they are, then hangs up."""

    reply = b""

    def do_GET(self):
        self.wfile.write(self.reply)
        self.close_connection = True

    def log_message(self, *args):
        pass


def refusal_from(handler: type, data_dir: Path) -> tuple[str, str]:
    """The URL of a local server answering with `handler`, and download.fetch's DataError
    message for it."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}"
        try:
            with pytest.raises(DataError) as refused:
                download.fetch("cifar10", data_dir, url=url, md5="0" * 32)
        finally:
            server.shutdown()
    return url, str(refused.value)


@pytest.mark.parametrize("reply, error", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nonly a few bytes",
     "IncompleteRead"),
    (b"<html>Sign in to the hotel's network</html>\r\n", "BadStatusLine"),
], ids=["cut chunked body", "captive portal"])
def test_fetch_a_broken_reply_names_url_and_the_offline_way(tmp_path, monkeypatch, reply,
                                                             error):
    """http.client's errors for a reply cut short or garbled are no OSErrors: they were a
    traceback. Nothing is kept."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = type("Reply", (_RawReply,), {"reply": reply})
    data_dir = tmp_path / "data"
    url, message = refusal_from(handler, data_dir)
    assert message.startswith(f"Could not download {url}: the server's reply was cut short "
                              f"or malformed ({error}: ")
    assert "--dataset synthetic" in message and plain_line(message)
    assert list(data_dir.iterdir()) == []


class _SilentReply(BaseHTTPRequestHandler):
    """Takes every GET and says nothing for a minute: a server that hangs. Not for a few
    seconds only: a client held off the CPU that long (a loaded host) would then meet a closed
    connection, not its timeout. The handler's thread is a daemon: nothing waits for it."""

    def do_GET(self):
        time.sleep(60)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_server_that_goes_silent_is_given_up_after_the_download_timeout(tmp_path, monkeypatch):
    """A connection that stays silent must end the download with the offline advice, not hang
    the command forever (urlopen waits for ever without a timeout)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 0.5)
    data_dir = tmp_path / "data"
    url, message = refusal_from(_SilentReply, data_dir)
    assert message.startswith(f"Could not download {url}: timed out.")
    assert "--dataset synthetic" in message
    assert list(data_dir.iterdir()) == []


def test_a_full_disk_while_downloading_names_the_folder_and_the_space(tmp_path, http_server):
    """Not a failed download: the advice to place the archive there by hand would fail the
    same way. Nothing is left."""
    (http_server.root / ARCHIVE).write_bytes(os.urandom(1 << 20))
    url = f"{http_server.url}/{ARCHIVE}"
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        with pytest.raises(DataError) as refused:
            download.fetch("cifar10", disk, url=url, md5="0" * 32)
        assert str(refused.value) == (
            f"cannot download {url} into {disk}: No space left on device. The archive needs "
            "1.0 MB there, and extracting it about as much again: free some space, or pass "
            "another --data-dir.")
        assert list(disk.iterdir()) == []


def test_a_download_past_the_file_size_limit_names_the_limit_not_the_network(tmp_path,
                                                                            http_server):
    """`ulimit -f` below the archive's size: the write fails with EFBIG, which read as a
    failed download (and the advice to place the archive by hand, which fails alike)."""
    (http_server.root / ARCHIVE).write_bytes(os.urandom(1 << 20))
    url, data = f"{http_server.url}/{ARCHIVE}", tmp_path / "data"
    data.mkdir()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(DataError) as refused:
            download.fetch("cifar10", data, url=url, md5="0" * 32)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert str(refused.value) == (
        f"cannot download {url} into {data}: File too large. The archive needs 1.0 MB "
        "there, and extracting it about as much again: raise this process's file size limit "
        "(`ulimit -f unlimited`).")
    assert list(data.iterdir()) == []


def test_a_full_disk_under_a_download_of_unknown_size_names_what_was_written(tmp_path,
                                                                             monkeypatch):
    """A chunked reply gives no Content-Length: the space needed is at least what was written
    before the disk filled (64 KB here, of a 1 MB archive), not a size made up."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    body = os.urandom(1 << 20)
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        url, message = refusal_from(type("Reply", (_RawReply,), {"reply": reply}), disk)
        assert message == (
            f"cannot download {url} into {disk}: No space left on device. The archive needs "
            "over 0.1 MB there, and extracting it about as much again: free some space, or "
            "pass another --data-dir.")
        assert list(disk.iterdir()) == []


def test_a_download_of_many_read_blocks_is_kept_whole(tmp_path, http_server):
    """The reply is read in 1 MB blocks: CIFAR-10's 170 MB archive is many of them."""
    content = os.urandom((2 << 20) + 12345)
    (http_server.root / ARCHIVE).write_bytes(content)
    dest = download.download(f"{http_server.url}/{ARCHIVE}", hashlib.md5(content).hexdigest(),
                             tmp_path / "data" / ARCHIVE)
    assert dest.read_bytes() == content


def test_a_download_killed_midway_leaves_a_part_file_the_next_prepare_sweeps(tmp_path,
                                                                             monkeypatch):
    """SIGKILL runs no cleanup: the temporary file a download writes must be one that the
    sweep of stale files knows, or it stays in the data folder for good."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    data_dir = tmp_path / "data"
    during = []

    class Looking(BaseHTTPRequestHandler):
        """Notes the data folder's files while the download waits for its reply; 404."""

        def do_GET(self):
            during.extend(p.name for p in data_dir.iterdir())
            self.send_error(404)

        def log_message(self, *args):
            pass

    refusal_from(Looking, data_dir)
    assert len(during) == 1 and during[0].startswith(f".{ARCHIVE}.")
    (data_dir / during[0]).write_bytes(b"cut short by a kill")  # as a killed download left it
    prepare("synthetic", data_dir, synthetic_size=(20, 5), workers=1)
    assert not (data_dir / during[0]).exists()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("evil", ["parent", "absolute", "symlink", "hardlink"])
def test_fetch_refuses_archive_members_that_escape(tmp_path, http_server, evil):
    outside = tmp_path / "outside"
    member = {
        "parent": _member("../../outside"),
        "absolute": _member(str(outside)),
        "symlink": _member(f"{LAYOUT.folder}/link", tarfile.SYMTYPE, str(outside)),
        "hardlink": _member(f"{LAYOUT.folder}/link", tarfile.LNKTYPE, str(outside)),
    }[evil]
    made = write_cifar10(tmp_path / "made")
    data = b"pwned" if member.isfile() else b""
    archive = make_tar_gz(http_server.root / ARCHIVE, made.folder, [(member, data)])
    data_dir = tmp_path / "data"  # extraction goes to a staging folder in data_dir
    with pytest.raises(DataError, match="refusing to extract"):
        download.fetch("cifar10", data_dir, url=f"{http_server.url}/{ARCHIVE}", md5=md5(archive))
    assert not outside.exists() and not (tmp_path / "data" / "outside").exists()
    assert [p.name for p in data_dir.iterdir()] == [ARCHIVE]  # no folder, no staging left


def test_extracted_files_get_no_unsafe_modes_and_no_owner_from_the_archive(tmp_path,
                                                                            closed_port):
    """tarfile extracts a member's mode (setuid, world-writable) and, for root, its owner as
    they are; the "data" filter clears the one and keeps the other ours."""
    made = write_cifar10(tmp_path / "made")
    member = _member(f"{LAYOUT.folder}/extra")
    member.mode, member.uid, member.gid = 0o4777, 12345, 12345
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = make_tar_gz(data_dir / ARCHIVE, made.folder, [(member, b"extra")])
    folder = download.fetch("cifar10", data_dir, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}",
                            md5=md5(archive))
    extra = (folder / "extra").stat()
    assert extra.st_mode & 0o7777 == 0o755
    assert (extra.st_uid, extra.st_gid) == (os.geteuid(), os.getegid())


def test_an_archive_damaged_anywhere_is_extracted_or_named_never_a_traceback(tmp_path):
    """Bytes garbled at 150 places along a compressed archive: each damaged copy either
    extracts (a stored block has no check of its own; fetch's md5 is the guard) or is named
    as no readable tar.gz, zlib's errors in a member's data among them (they escaped as
    zlib.error, a traceback: extractall lets them through)."""
    rng = np.random.default_rng(0)
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):  # compressible, and of fixed headers (mtime 0): the same bytes
            data = rng.choice(list(b"abcdefgh"), 100_000).astype(np.uint8).tobytes()
            member = _member(f"made/part{i}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    good, causes = archive.read_bytes(), []
    for offset in range(100, len(good) - 20, len(good) // 150):
        damaged = bytearray(good)
        damaged[offset:offset + 8] = bytes(b ^ 0x5A for b in damaged[offset:offset + 8])
        archive.write_bytes(damaged)
        (target := tmp_path / f"out-{offset}").mkdir()
        try:
            download.safe_extract(archive, target)
        except DataError as error:
            message = str(error)
            assert message.startswith(f"{archive} is not a readable tar.gz archive (")
            assert message.endswith("). Delete it and run again."), message
            causes.append(message)
    assert any("while decompressing data" in cause for cause in causes), causes  # zlib's


@pytest.mark.slow
def test_prepare_cli_offline_fails_with_one_clear_paragraph(tmp_path, closed_port):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    dead_proxy = f"http://127.0.0.1:{closed_port}"  # no request can leave this machine
    env.update(https_proxy=dead_proxy, HTTPS_PROXY=dead_proxy, http_proxy=dead_proxy)
    result = subprocess.run(
        [sys.executable, "-m", "loaders.prepare", "--dataset", "cifar10", "--data-dir",
         str(data_dir)], capture_output=True, text=True, timeout=120, env=env,
        cwd=Path(__file__).parents[1])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stdout == ""
    message = result.stderr.strip()
    assert "\n\n" not in message and message.startswith("error: ")
    assert LAYOUT.url in message and ARCHIVE in message and "--dataset synthetic" in message
    assert not data_dir.exists()  # made for the download, and removed again: it was left empty


# --- the data folder ---------------------------------------------------------------------------


def _bad_data_dirs(tmp_path: Path, read_only: Path) -> dict[str, tuple[str, str]]:
    """case: (--data-dir value, words the one-line error must hold)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"empty": ("", "--data-dir: an empty value"),
            "a file": (str(a_file), f"{a_file} is a file, not a folder"),
            "under a file": (str(a_file / "data"), f"{a_file} is a file, not a folder"),
            # /dev/null: not called a file (it was, by this check alone)
            "a device": ("/dev/null", "/dev/null is a device, pipe or socket, not a folder"),
            "read-only": (str(read_only), f"{read_only} cannot be written ("),
            "under a read-only folder": (str(read_only / "data"),
                                         f"{read_only} cannot be written (")}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["loaders/prepare.py", "engine/train.py"])
def test_unusable_data_dir_is_refused_before_any_work(tmp_path, read_only_dir, script, capsys):
    """The empty value (argparse's refusal) and the read-only folder (the command's own) by a
    real subprocess, the other cases through the script's main() in this process (its exit
    code and stderr the same; a process each took 1.5 seconds)."""
    from engine import train as train_cli
    from loaders import prepare as prepare_cli

    main = train_cli.main if script == "engine/train.py" else prepare_cli.main
    before = sorted(ROOT.iterdir())
    for case, (value, words) in _bad_data_dirs(tmp_path, read_only_dir).items():
        args = ["--dataset", "synthetic", "--synthetic-size", "20", "5", "--data-dir", value]
        if script == "engine/train.py":
            args += ["--epochs", "1", "--out", str(tmp_path / "run")]
        result = (run_script(script, *args, timeout=120) if case in ("empty", "read-only") else
                  in_process(capsys, main, *args))
        code, err = result.returncode, result.stderr
        assert code in (1, 2), case
        assert words in err and "Traceback" not in err, (case, err)
        assert len(err.strip().splitlines()) == 1, (case, err)
        last = err.strip()
        assert last.startswith("error: ") or ": error: argument --data-dir: " in last, case
    assert sorted(ROOT.iterdir()) == before  # nothing written to the current directory
    assert list(read_only_dir.iterdir()) == [] and not (tmp_path / "run").exists()


@contextmanager
def read_only_view(folder: Path, view: Path) -> Iterator[Path]:
    """`folder` seen read-only at `view`: a read-only bind mount for root (who ignores modes),
    a copy with read-only modes otherwise."""
    view.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(folder), str(view)]).returncode:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    else:
        shutil.copytree(folder, view, dirs_exist_ok=True)
        for path in (view, *view.rglob("*")):
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield view
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(view)], check=True)
        else:
            for path in (view, *view.rglob("*")):
                path.chmod(0o755)


def test_a_prepared_read_only_data_dir_is_used_as_is(tmp_path):
    """A shared, prepared data folder need not be writable: nothing is written to it."""
    made = prepare("synthetic", tmp_path / "data", synthetic_size=(20, 5), workers=1)
    with read_only_view(tmp_path / "data", tmp_path / "shared") as shared:
        again = prepare("synthetic", shared, synthetic_size=(20, 5), workers=1)
        assert again.train == shared / made.train.name and again.mean == made.mean
        with pytest.raises(DataError, match=r"cannot be written \("):
            prepare("synthetic", shared, synthetic_size=(21, 5), workers=1)  # must write


def test_a_damaged_beton_in_a_read_only_data_dir_is_named(tmp_path):
    """.beton files copied without their source into a read-only folder, one damaged: the
    error said only that the folder cannot be written, never which file had to be rebuilt."""
    made = prepare("synthetic", tmp_path / "data", synthetic_size=(20, 5), workers=1)
    shutil.rmtree(made.source)
    with open(made.test, "r+b") as f:  # same size, other bytes: its sidecar's hash tells
        f.write(b"\xff" * 64)
    with read_only_view(tmp_path / "data", tmp_path / "shared") as shared, pytest.raises(
            DataError) as refused:
        prepare("synthetic", shared, synthetic_size=(20, 5), workers=1)
    message = str(refused.value)
    assert f"{shared} cannot be written (" in message
    assert (f", and the data must be written there again: {shared / made.test.name} is damaged "
            "(its content differs from the hash its sidecar records); ") in message


def test_prepared_betons_are_used_without_their_source(tmp_path, monkeypatch, closed_port):
    """.beton files copied to a box without their source (as FFCV users copy them) are used
    as they are, when whole by their sidecars; a damaged one needs the source again."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    offline = replace(LAYOUT, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}")
    monkeypatch.setitem(layouts.LAYOUTS, "cifar10", offline)  # a download would fail at once
    data = write_cifar10(tmp_path / "data")
    made = prepare("cifar10", data.data_dir, workers=1)
    # named after the dataset (the names FFCV users copy), not after its python folder
    assert (made.train, made.test) == (data.data_dir / "cifar10-train.beton",
                                       data.data_dir / "cifar10-test.beton")
    shutil.rmtree(data.folder)
    (data.data_dir / ARCHIVE).write_bytes(b"an archive is no source at hand: extracting writes")
    assert prepare("cifar10", data.data_dir, workers=1) == made
    assert not data.folder.exists()  # nothing fetched, extracted or made again
    synthetic_made = prepare("synthetic", data.data_dir, synthetic_size=(20, 5), workers=1)
    shutil.rmtree(synthetic_made.source)
    assert prepare("synthetic", data.data_dir, synthetic_size=(20, 5)) == synthetic_made
    assert not synthetic_made.source.exists()
    sidecar = beton.sidecar(made.train)
    kept = sidecar.read_text()
    sidecar.write_text(json.dumps({**json.loads(kept), "format": beton.FORMAT - 1}))
    with pytest.raises(DataError, match=f"{ARCHIVE} .* or its extracted folder"):
        prepare("cifar10", data.data_dir, workers=1)  # an older release's sidecar vouches not
    sidecar.write_text(kept)
    with open(made.test, "r+b") as f:  # same size, other bytes: its sidecar's hash catches it
        f.write(b"\xff" * 64)
    with pytest.raises(DataError, match=f"{ARCHIVE} .* or its extracted folder"):
        prepare("cifar10", data.data_dir, workers=1)


def test_a_failed_fetch_of_a_damaged_betons_source_says_why_it_was_fetched(
        tmp_path, monkeypatch, closed_port):
    """.beton files copied without their source, one damaged, offline: the error said only
    that the archive could not be downloaded, not why prepared data was being fetched."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    offline = replace(LAYOUT, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}")
    monkeypatch.setitem(layouts.LAYOUTS, "cifar10", offline)
    data = write_cifar10(tmp_path / "data")
    made = prepare("cifar10", data.data_dir, workers=1)
    shutil.rmtree(data.folder)
    with open(made.train, "r+b") as f:  # same size, other bytes
        f.write(b"\xff" * 64)
    with pytest.raises(DataError) as refused:
        prepare("cifar10", data.data_dir, workers=1)
    assert str(refused.value).startswith(
        f"{made.train} is damaged (its content differs from the hash its sidecar records); "
        "making the .beton files again from their source failed: Could not download ")
    # what to do offline kept apart, as a resumed run says its own (engine.resume), and said
    # once: with fetch's whole message in `failure`, a new run said it twice, a resumed run
    # once with --dataset synthetic, which --resume refuses
    assert isinstance(refused.value, download.Unfetched)
    assert str(refused.value).endswith(f"in {data.data_dir}, or use --dataset synthetic.")
    assert refused.value.failure.endswith(": [Errno 111] Connection refused.")
    assert "offline" not in refused.value.failure and "synthetic" not in refused.value.failure
    assert str(refused.value).count("To work offline") == 1


def test_a_damaged_betons_source_that_cannot_be_written_says_why_it_was_fetched(
        tmp_path, monkeypatch, http_server):
    """Not a failed download: the archive outgrows `ulimit -f` while written. The error still
    says why prepared data was being fetched (which .beton is damaged), before the write's own
    words and fix, and it is no Unfetched (placing the archive by hand would fail alike)."""
    (http_server.root / ARCHIVE).write_bytes(os.urandom(1 << 20))
    url = f"{http_server.url}/{ARCHIVE}"
    monkeypatch.setitem(layouts.LAYOUTS, "cifar10", replace(LAYOUT, url=url))
    data = write_cifar10(tmp_path / "data")
    made = prepare("cifar10", data.data_dir, workers=1)
    shutil.rmtree(data.folder)
    with open(made.train, "r+b") as f:  # same size, other bytes
        f.write(b"\xff" * 64)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(DataError) as refused:
            prepare("cifar10", data.data_dir, workers=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert not isinstance(refused.value, download.Unfetched)
    assert str(refused.value) == (
        f"{made.train} is damaged (its content differs from the hash its sidecar records); "
        f"making the .beton files again from their source failed: cannot download {url} into "
        f"{data.data_dir}: File too large. The archive needs 1.0 MB there, and extracting it "
        "about as much again: raise this process's file size limit (`ulimit -f unlimited`).")


def test_a_test_beton_normalized_with_another_training_split_is_rebuilt(tmp_path):
    """The same test images, but a .beton (and sidecar) normalized with another training
    split's statistics: with the source at hand, the test split is written again, normalized
    with this training split's."""
    made = prepare("cifar10", write_cifar10(tmp_path / "data").data_dir, workers=1)
    other = write_cifar10(tmp_path / "other")
    write_batch(other.folder / LAYOUT.train_files[0],
                random_split(3, np.random.default_rng(9)))  # the same test split, other train
    other_made = prepare("cifar10", other.data_dir, workers=1)
    assert other_made.mean != made.mean
    for path in (other_made.test, beton.sidecar(other_made.test)):
        shutil.copyfile(path, made.test.parent / path.name)
    assert prepare("cifar10", tmp_path / "data", workers=1) == made
    test = sidecar_info(made.test)
    assert (test.mean, test.std) == (made.mean, made.std)


def test_betons_of_two_preparations_are_not_used_together_without_their_source(tmp_path):
    """A test .beton copied from another preparation, whole by its sidecar but normalized with
    another training split's statistics: without their source, the two are not used together."""
    made = prepare("cifar10", write_cifar10(tmp_path / "data").data_dir, workers=1)
    other = prepare("cifar10", write_cifar10(tmp_path / "other", seed=1).data_dir, workers=1)
    assert (other.mean, other.std) != (made.mean, made.std)
    shutil.rmtree(made.source)
    for path in (other.test, beton.sidecar(other.test)):
        shutil.copyfile(path, made.test.parent / path.name)
    with read_only_view(tmp_path / "data", tmp_path / "shared") as shared, pytest.raises(
            DataError) as refused:
        prepare("cifar10", shared, workers=1)
    assert (f", and the data must be written there again: {made.train.name} and "
            f"{made.test.name} were not made together; ") in str(refused.value)


@pytest.mark.parametrize("source", ["kept", "gone"])
def test_a_missing_beton_in_a_read_only_data_dir_is_named_missing(tmp_path, source):
    """A .beton deleted beside its sidecar, in a read-only folder: the error called it "no
    longer matching" its source, or its sidecar "of another release" without the source."""
    made = prepare("synthetic", tmp_path / "data", synthetic_size=(20, 5), workers=1)
    if source == "gone":
        shutil.rmtree(made.source)
    made.train.unlink()
    with read_only_view(tmp_path / "data", tmp_path / "shared") as shared, pytest.raises(
            DataError) as refused:
        prepare("synthetic", shared, synthetic_size=(20, 5), workers=1)
    assert (f", and the data must be written there again: {shared / made.train.name} is "
            "missing; ") in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("before", ["nothing", "a damaged train.beton"])
def test_two_processes_preparing_one_folder_share_its_files(tmp_path, before):
    """The second waits for the first (a lock on the folder), then reuses what it wrote: also
    when both find a prepared folder whose .beton must be rebuilt."""
    data_dir = tmp_path / "data"
    command = [sys.executable, str(ROOT / "loaders/prepare.py"), "--dataset", "synthetic",
               "--synthetic-size", "10000", "1000", "--data-dir", str(data_dir)]
    if before != "nothing":
        subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=300)
        train = data_dir / "synthetic-10000-1000-seed0-train.beton"
        with open(train, "r+b") as f:  # same size, other bytes: its sidecar's hash catches it
            f.seek(train.stat().st_size // 2)
            f.write(b"\xff" * 4096)
    both = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(p.communicate(timeout=300), p.returncode) for p in both]
    for (out, err), code in results:
        assert code == 0 and "Traceback" not in err, err
        assert out == results[0][0][0]
    waited = [err for (_, err), _ in results if "waiting for another process" in err]
    assert len(waited) == 1 and waited[0].strip().endswith(
        f"notice: waiting for another process preparing {data_dir} to finish "
        f"({data_dir / '.prepare.lock'})")
    name = "synthetic-10000-1000-seed0"
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        [name, *(f"{name}-{split}.beton{json}" for split in ("train", "test")
                 for json in ("", ".json"))])


@pytest.mark.slow
def test_a_prepared_folder_is_read_while_another_process_holds_its_lock(tmp_path):
    """Every rank of a multi-GPU run prepares the same folder at once: reading a prepared one
    takes no lock, so none waits for another (nor says so)."""
    data_dir = tmp_path / "data"
    prepare("synthetic", data_dir, synthetic_size=(200, 50), workers=1)
    with waiting_lock(data_dir / ".prepare.lock", lambda: None):  # a writer, elsewhere
        result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--synthetic-size",
                            200, 50, "--data-dir", data_dir, timeout=120)  # a wait: fails
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_data_dir_on_a_full_disk_is_refused_with_the_reason(tmp_path):
    """A disk out of inodes (or space) is named as such, not called read-only."""
    full = tmp_path / "full"
    refusal = re.escape(f"--data-dir {full}: {full} cannot be written (No space left on device)")
    with tmpfs(full, "size=1m,nr_inodes=1"), pytest.raises(DataError, match=refusal):
        prepare("synthetic", full, synthetic_size=(20, 5))


def test_a_folder_on_a_disk_without_space_is_refused_before_any_work(tmp_path):
    """An empty file can still be made on a full disk: --out and --data-dir are refused
    there all the same, before hours of training find out at the first checkpoint."""
    full = tmp_path / "full"
    with tmpfs(full, "size=64k"):
        with open(full / "filler", "wb") as filler, pytest.raises(OSError):
            filler.write(b"x" * (1 << 20))
            filler.flush()
        with pytest.raises(OutputError, match=re.escape(
                f"--out {full / 'run'} cannot be written (No space left on device)")), \
                output_dir(full / "run"):
            pass
        assert not (full / "run").exists()  # made, found unwritable and removed: no trace
        with pytest.raises(DataError, match=re.escape(
                f"--data-dir {full}: {full} cannot be written (No space left on device)")):
            prepare("synthetic", full, synthetic_size=(20, 5))


def test_prepare_checks_the_data_dir_first(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(DataError, match=f"{a_file} is a file"):
        prepare("synthetic", a_file, synthetic_size=(20, 5))


def test_numba_settings_it_would_fail_on_are_refused_before_any_data_is_written(
        tmp_path, monkeypatch):
    """FFCV's compiler reads them only once the source is written: a download (170 MB for
    CIFAR-10) or a whole conversion was done before the error, and left behind."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "0")
    with pytest.raises(SetupError, match="^NUMBA_NUM_THREADS='0' is not a number of threads"):
        prepare("synthetic", tmp_path / "data", synthetic_size=(20, 5), workers=1)
    assert not (tmp_path / "data").exists()


def test_what_a_killed_writer_left_is_swept_by_the_next_prepare(tmp_path):
    """SIGKILL (the OOM killer) runs no cleanup: a partial download, an extraction's staging
    folder and the source folder's staging folder stayed in the data folder for good."""
    data = tmp_path / "data"
    stale = [data / ".cifar-10-python.tar.gz.x1y2.part", data / ".extract-k3j4" / "f",
             data / f".{python_folder.synthetic_folder_name(20, 5)}-q9w8" / "data_batch_1"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a killed writer")
    (data / ".keep").write_text("not ours")
    (tmp_path / "elsewhere").mkdir()  # a link among them goes, not the folder it leads to
    (data / ".extract-ln").symlink_to(tmp_path / "elsewhere")
    prepare("synthetic", data, synthetic_size=(20, 5), workers=1)
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == [".keep"]
    assert (tmp_path / "elsewhere").is_dir()


@pytest.mark.slow
def test_a_full_disk_while_writing_the_python_folder_is_named(tmp_path):
    with tmpfs(tmp_path / "disk", "size=300k") as disk:
        result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--synthetic-size",
                            200, 50, "--data-dir", disk, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"error: Writing {disk / 'synthetic-200-50-seed0'} "
                                        "failed (No space left on device); it needs about 0.8 MB")
        assert "free some space there or use a --data-dir on another disk" in result.stderr
        assert result.stderr.count("\n") == 1
        assert list(disk.iterdir()) == []  # no staging folder, no lock file


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask 022", "umask 002"])
def test_data_made_in_temporary_folders_gets_the_usual_permissions(tmp_path, served_archive,
                                                                   umask):
    made, url, digest = served_archive
    old = os.umask(umask)
    try:
        folder = python_folder.write_synthetic(tmp_path, 20, 5)
        download.fetch("cifar10", tmp_path / "cifar", url=url, md5=digest)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "cifar" / ARCHIVE).stat().st_mode & 0o777 == 0o666 & ~umask


# --- validation -------------------------------------------------------------------------------


def test_the_layouts_are_where_and_how_the_datasets_are_published():
    """Each layout's URL, md5 and files are the published ones, as torchvision's own CIFAR
    readers have them: a wrong md5 refuses every real download as corrupt, and the tests'
    own archives are checked against whatever md5 the layout holds."""
    from torchvision import datasets

    for name, published in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        layout = layouts.LAYOUTS[name]
        assert (layout.url, layout.md5, layout.folder) == (
            published.url, published.tgz_md5, published.base_folder), name
        assert list(layout.train_files) == [file for file, _ in published.train_list], name
        assert list(layout.test_files) == [file for file, _ in published.test_list], name
        assert layout.meta_file == published.meta["filename"], name
        assert layout.names_key == published.meta["key"].encode(), name


def test_read_folder_reads_images_labels_and_class_names(cifar10_dir):
    data = read(cifar10_dir.folder)
    assert data.classes == CIFAR10_CLASSES
    assert data.source == cifar10_dir.folder
    assert_splits_equal(data.train, cifar10_dir.train)
    assert_splits_equal(data.test, cifar10_dir.test)


def test_load_reads_an_existing_cifar10_folder(cifar10_dir):
    data = cifar.load("cifar10", cifar10_dir.data_dir)
    assert_splits_equal(data.train, cifar10_dir.train)


def test_load_reads_cifar100s_fine_labels_and_names_not_its_coarse_ones(tmp_path):
    """CIFAR-100's files hold two labelings: its 100 fine classes, the dataset's, and 20
    coarse superclasses beside them, which training on cifar100 never reads."""
    layout = layouts.LAYOUTS["cifar100"]
    folder = tmp_path / "data" / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine = [f"fine{i}" for i in range(100)]
    splits = {}
    for name, n in ((layout.train_files[0], 30), (layout.test_files[0], 10)):
        split = random_split(n, rng, num_classes=100)
        dump_pickle(folder / name, {b"data": to_rows(split.images),
                                    b"fine_labels": split.labels.tolist(),
                                    b"coarse_labels": (split.labels // 5).tolist()})
        splits[name] = split
    dump_pickle(folder / layout.meta_file, {
        b"fine_label_names": [c.encode() for c in fine],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    data = cifar.load("cifar100", tmp_path / "data")
    assert data.classes == fine and data.source == folder
    assert_splits_equal(data.train, splits[layout.train_files[0]])
    assert_splits_equal(data.test, splits[layout.test_files[0]])


def test_rows_are_rgb_planes_in_row_major_order(cifar10_dir):
    """Row layout of the CIFAR python format: 1024 R, then 1024 G, then 1024 B values."""
    row = np.random.default_rng(0).integers(0, 256, 3072, dtype=np.uint8)
    dump_pickle(cifar10_dir.folder / "test_batch", {b"data": row[None], b"labels": [3]})
    image = read(cifar10_dir.folder).test.images[0]
    for y, x, c in np.ndindex(32, 32, 3):
        assert image[y, x, c] == row[1024 * c + 32 * y + x]


@pytest.mark.parametrize("rows", [
    (1, 1, 1, 1, 1),
    (7, 2, 13, 1, 3),
    (4, 0, 2, 1, 1),
])
def test_batches_with_any_number_of_rows(tmp_path, rows):
    made = write_cifar10(tmp_path / "data", rows=rows)
    assert_splits_equal(read(made.folder).train, made.train)


@pytest.mark.parametrize("protocol", [
    "py2", 2, 3, 4, 5,
])
def test_batches_pickled_with_any_protocol_are_read(tmp_path, protocol):
    made = write_cifar10(tmp_path / "data", protocol=protocol)
    assert_splits_equal(read(made.folder).test, made.test)


@pytest.mark.filterwarnings("error::DeprecationWarning")
@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy 2", "numpy 1"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_folders_written_by_python3_are_read_like_the_original(tmp_path, protocol, numpy1):
    """Python 3 code pickles numpy's functions under its own numpy's names: numpy.core under
    numpy 1 (its labels' integers as numpy.core.multiarray.scalar, its arrays at protocol 5
    as numpy.core.numeric._frombuffer), numpy._core under numpy 2. Either is read, without
    the DeprecationWarning numpy 2 gives for its old names (they are read as numpy._core)."""
    made = write_cifar10(tmp_path / "data", protocol=protocol, py3=True, numpy1=numpy1)
    written = (made.folder / "test_batch").read_bytes()
    assert (b"numpy.core.multiarray" in written) == numpy1 != (b"numpy._core." in written)
    got = read(made.folder)
    assert got.classes == CIFAR10_CLASSES
    assert_splits_equal(got.train, made.train)
    assert_splits_equal(got.test, made.test)


@pytest.mark.parametrize("labels", [list, np.asarray, lambda a: [int(x) for x in a],
                                    lambda a: a.astype(np.uint8), lambda a: a[:, None],
                                    lambda a: [[int(x)] for x in a]],
                         ids=["numpy integers", "an array", "python ints", "a uint8 array",
                              "a column, as Keras keeps them", "a list of one-int lists"])
def test_labels_in_any_integer_form_are_read(cifar10_dir, labels):
    """Python 3 writers save labels as a list, an array of any integer type, or a column (Keras's
    y_train is N x 1): each is one label an image, read as int64."""
    path = cifar10_dir.folder / "test_batch"
    test = cifar10_dir.test
    dump_pickle(path, {"data": to_rows(test.images), "labels": labels(test.labels)}, 4)
    assert_splits_equal(read(cifar10_dir.folder).test, test)


@pytest.mark.parametrize("protocol", ["py2", 4])
def test_class_names_in_latin1_bytes_are_read_as_latin1(cifar10_dir, protocol):
    """Python 2 era files may hold names in Latin-1: read as such, not refused or garbled."""
    names = [b"caf\xe9", "na\u00efve".encode(), *(c.encode() for c in CIFAR10_CLASSES[2:])]
    dump_pickle(cifar10_dir.folder / "batches.meta", {b"label_names": names}, protocol)
    assert read(cifar10_dir.folder).classes == ["caf\u00e9", "na\u00efve",
                                                *CIFAR10_CLASSES[2:]]


@pytest.mark.parametrize("container", [np.array, lambda names: list(np.array(names))],
                         ids=["an array", "a list of numpy scalars"])
@pytest.mark.parametrize("kind", ["str", "bytes"])
@pytest.mark.parametrize("protocol", ["py2", 4])
def test_class_names_of_numpy_are_read_as_plain_text(cifar10_dir, kind, protocol, container):
    """An array of names, or a list of numpy's str or bytes scalars (list(array)), as
    numpy-minded writers save them, is read as plain str: numpy's str scalars went into the
    run's ckpt.pt, which a weights-only load then refused (numpy._core.multiarray.scalar), so
    resume, evaluate and predict failed on the run's own checkpoint."""
    names = container(CIFAR10_CLASSES if kind == "str" else [c.encode() for c in CIFAR10_CLASSES])
    dump_pickle(cifar10_dir.folder / "batches.meta", {"label_names": names}, protocol)
    classes = read(cifar10_dir.folder).classes
    saved = io.BytesIO()
    torch.save({"classes": classes}, saved)  # as engine.checkpoint saves them
    saved.seek(0)
    assert torch.load(saved, weights_only=True)["classes"] == classes == CIFAR10_CLASSES


def test_class_names_in_a_tuple_are_read(cifar10_dir: Cifar10Dir) -> None:
    """A tuple of names (tuple(names), or names unpacked from a zip) is as good as a list: Python
    3 writers save either."""
    dump_pickle(cifar10_dir.folder / "batches.meta", {"label_names": tuple(CIFAR10_CLASSES)}, 4)
    assert read(cifar10_dir.folder).classes == CIFAR10_CLASSES


def test_a_batch_saved_as_an_ordered_dict_is_read(cifar10_dir):
    path = cifar10_dir.folder / "test_batch"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    dump_pickle(path, collections.OrderedDict(batch), 4)
    assert_splits_equal(read(cifar10_dir.folder).test, cifar10_dir.test)


def _good_batch(n: int = 4) -> dict:
    split = random_split(n, np.random.default_rng(1))
    return {b"data": split.images.transpose(0, 3, 1, 2).reshape(n, -1).copy(),
            b"labels": split.labels.tolist()}


def _with(**changes) -> dict:
    batch = _good_batch()
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    return batch


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def assert_refused(made, path: Path, words: str) -> None:
    """read_folder and prepare both raise a DataError naming path; no .beton is written."""
    with pytest.raises(DataError) as error:
        read(made.folder)
    assert str(path) in str(error.value) and words in str(error.value)
    with pytest.raises(DataError, match=path.name):
        prepare("cifar10", made.data_dir, workers=1)
    assert made.betons() == []


MALFORMED = {  # case: (file, what to write there or do to it, words the message must hold)
    "missing file": ("data_batch_3", Path.unlink, "is missing"),
    "a folder": ("data_batch_3", lambda p: p.unlink() or p.mkdir(), "data_batch_3 is a folder."),
    "a pipe": ("data_batch_3", lambda p: p.unlink() or os.mkfifo(p),  # was 'is missing'
               "data_batch_3 is a device, pipe or socket, not a file."),
    "a link to nothing": ("data_batch_3", lambda p: p.unlink() or p.symlink_to("gone"),
                          "data_batch_3 is a symbolic link that cannot be followed (to gone"),
    "a link to itself": ("data_batch_3", lambda p: p.unlink() or p.symlink_to(p.name),
                         "data_batch_3 is a symbolic link that cannot be followed"),
    "truncated file": ("data_batch_2", _truncate, "truncated"),
    "garbage file": ("test_batch", lambda p: p.write_bytes(b"\x00junk" * 999), "truncated"),
    "a damaged header": ("data_batch_2",  # its pixels' type u1 became u9: TypeError, not EOF
                         lambda p: p.write_bytes(p.read_bytes().replace(b"U\x02u1", b"U\x02u9")),
                         "not a CIFAR python batch (TypeError: data type 'u9' not understood)"),
    "not a dict": ("data_batch_1", [1, 2, 3], "not a CIFAR batch dict"),
    "no data key": ("data_batch_4", _with(data=None), "no 'data' entry"),
    "no labels key": ("test_batch", _with(labels=None), "no 'labels' entry"),
    "int64 data": ("data_batch_5", _with(data=_good_batch()[b"data"].astype(np.int64)),
                   "uint8"),
    "3071 values a row": ("data_batch_1", _with(data=np.zeros((4, 3071), np.uint8)), "3072"),
    "fewer labels than rows": ("test_batch", _with(labels=[0, 1, 2]), "one integer label"),
    "two labels an image": ("data_batch_1", _with(labels=np.zeros((4, 2), int)),
                            "labels of shape (4, 2) and type int64"),
    "ragged labels": ("data_batch_1", _with(labels=[[1, 2], [3], 0, 0]),
                      "ragged labels (lists of different lengths); expected one integer label"),
    "label 10": ("data_batch_2", _with(labels=[0, 1, 10, 2]), "outside 0..9"),
    "label -1": ("data_batch_2", _with(labels=[0, -1, 1, 2]), "outside 0..9"),
    "meta without label_names": ("batches.meta", {b"num_vis": 3072}, "label_names"),
    "label_names a dict": ("batches.meta", {"label_names": {"cat": 0}},
                           "no 'label_names' list of class names (found a dict)"),
    "label_names of ints": ("batches.meta", {"label_names": list(range(10))},
                            "no 'label_names' list of class names (found a list of int)"),
    "one class": ("batches.meta", {"label_names": ["only"]},
                  "names 1 class (only); a classifier needs at least 2 classes"),
    "class names with line breaks": ("batches.meta",  # as readlines() leaves them
                                     {"label_names": [f"{c}\n" for c in CIFAR10_CLASSES]},
                                     "are blank or hold a line break, tab or other control "
                                     "character ('airplane\\n', 'automobile\\n', "),
    "class names with a tab, a NUL, blank": (
        "batches.meta", {"label_names": ["a\tb", "c\x00", "", " ", *CIFAR10_CLASSES[4:]]},
        "character ('a\\tb', 'c\\x00', '', ' '); give each class a plain name"),
    "duplicate class names": ("batches.meta", {"label_names": [*CIFAR10_CLASSES[:9], "cat"]},
                              "names the class cat more than once"),
    "empty test split": ("test_batch", {"data": np.zeros((0, 3072), np.uint8), "labels": []},
                         "test_batch holds no images"),
    "str keys, no labels": ("test_batch", {"data": np.zeros((2, 3072), np.uint8)},
                            "no 'labels' entry"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_raises_data_error_naming_it(cifar10_dir, case):
    name, change, words = MALFORMED[case]
    path = cifar10_dir.folder / name
    if callable(change):
        change(path)
    else:
        dump_pickle(path, change)
    assert_refused(cifar10_dir, path, words)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", ["py2", 4])
def test_pickle_that_would_run_code_is_refused_not_run(cifar10_dir, tmp_path, protocol):
    marker = tmp_path / "ran"
    path = cifar10_dir.folder / "data_batch_1"
    dump_pickle(path, {b"data": _RunsCode(marker)}, protocol)
    assert_refused(cifar10_dir, path, "refusing to load")
    assert not marker.exists()


@pytest.mark.parametrize("locked", ["data_batch_2", "."], ids=["file", "folder"])
def test_a_batch_file_this_user_may_not_read_is_named_so(tmp_path, locked):
    """A batch file, or the python folder, that the user may not read: the file was said to be
    "truncated or not a CIFAR python batch" (and to be downloaded again), and behind a folder
    it could not enter the error was a generic "cannot use ...: check that it is writable"."""
    made = write_cifar10(tmp_path / "data")
    (made.folder / locked).chmod(0)
    try:
        result = subprocess.run(without_root_powers(
            [sys.executable, ROOT / "loaders" / "prepare.py", "--data-dir", made.data_dir]),
            capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        (made.folder / locked).chmod(0o755 if locked == "." else 0o644)
    named = made.folder / ("batches.meta" if locked == "." else locked)  # the first read
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {named} cannot be read (Permission denied); fix the permissions of the file "
        f"and its folder. Or: Delete {made.folder} to download it again")
    assert made.betons() == []


@pytest.mark.parametrize("locked", ["train.beton", "."], ids=["beton", "data dir"])
def test_a_prepared_file_this_user_may_not_read_is_named_with_the_fix(tmp_path, locked):
    """A prepared .beton, or the data folder, that the user may not read: the error said to
    check that the path 'exists, is writable and that its disk has free space'."""
    made = prepare("synthetic", tmp_path / "data", synthetic_size=(20, 5), workers=1)
    target = made.train if locked == "train.beton" else made.train.parent
    target.chmod(0)
    try:
        result = subprocess.run(without_root_powers(
            [sys.executable, ROOT / "loaders" / "prepare.py", "--dataset", "synthetic",
             "--synthetic-size", "20", "5", "--data-dir", made.train.parent]),
            capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    assert result.returncode == 1 and re.fullmatch(
        f"error: cannot use {re.escape(str(made.train.parent))}/\\S+: Permission denied; fix "
        "its permissions, or those of the folders above it, or choose another path.\n",
        result.stderr), result.stderr


# --- synthetic data ---------------------------------------------------------------------------


def test_synthetic_same_seed_same_data_other_seed_differs():
    first, again, other = (synthetic.make_split(40, seed) for seed in (3, 3, 4))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[2], other[2])


def _fingerprint(arrays) -> str:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode())
    return h.hexdigest()


# hashes of the synthetic data as first released: prepared caches hold this data
SYNTHETIC_HASHES = {(1, 0): "b5f4ce960a6556e7", (37, 0): "21ba6adc072e316f",
                    (40, 3): "fa34ff8086c74222", (605, 0): "3c43332aa048b4a1",
                    (201, 1): "a18d5cf5235ec121", (5000, 7): "d49ff100880f75b7"}


@pytest.mark.parametrize("chunk", [None, 7], ids=["default chunks", "chunks of 7"])
def test_synthetic_data_is_what_it_always_was_whatever_the_chunk(monkeypatch, chunk):
    """Generated in chunks, the data must be the same: same seed, same images, any chunk."""
    if chunk is not None:
        monkeypatch.setattr(synthetic, "CHUNK", chunk)
    for (n, seed), want in SYNTHETIC_HASHES.items():
        if chunk is None or n < 1000:  # 5000 images in chunks of 7 would only be slower
            assert _fingerprint(synthetic.make_split(n, seed)) == want, (n, seed)


# Generates n images under an address-space limit of what the process uses plus the images'
# bytes plus 256 MB: all float32 at once would take four times the images' bytes.
GENERATE_UNDER_LIMIT = """
import resource, sys
from loaders import synthetic
n = int(sys.argv[1])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
limit = int(status["VmSize"].split()[0]) * 1024 + n * 3072 + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
images, labels, boxes = synthetic.make_split(n, 0)
print(images.shape)
"""


@pytest.mark.slow
def test_synthetic_generation_needs_the_images_and_one_chunk():
    result = subprocess.run([sys.executable, "-c", GENERATE_UNDER_LIMIT, "40000"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "(40000, 32, 32, 3)\n"


def _limit_memory() -> None:
    """preexec_fn: 6 GB of address space (ulimit -v 6000000), less than 1M images need."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.slow
def test_a_synthetic_size_beyond_memory_is_refused_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "loaders/prepare.py"), "--dataset", "synthetic",
         "--synthetic-size", "1000000", "10", "--data-dir", str(tmp_path / "data")], cwd=ROOT,
        capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --synthetic-size 1000000 10 needs about 6.1 GB of "
                                    "memory")
    assert "GB is available; choose a smaller --synthetic-size" in result.stderr
    assert not (tmp_path / "data").exists()  # made for the data, removed again when refused


def write_cgroup(folder: Path, names: tuple[str, str, str], limit: str, used: int,
                 cache: int) -> None:
    """A memory cgroup's files, as the kernel shows them, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(f"{limit}\n")
    (folder / names[1]).write_text(f"{used}\n")
    (folder / "memory.stat").write_text(f"anon {used - cache}\n{names[2]} {cache}\n")


@pytest.mark.parametrize("version", [0, 1], ids=["v2", "v1"])
def test_a_cgroup_limit_counts_its_reclaimable_cache_as_free(tmp_path, version):
    _, names = list(hardware.CGROUPS.values())[version]
    write_cgroup(tmp_path, names, "1000000", 600_000, 200_000)
    assert hardware._cgroup_headroom(tmp_path, *names) == 1_000_000 - (600_000 - 200_000)


@pytest.mark.parametrize("version", [0, 1], ids=["v2", "v1"])
def test_a_limit_on_a_cgroup_above_this_process_is_found(tmp_path, version):
    """Slurm limits a job's cgroup and runs its steps in cgroups below it; `systemd-run -p
    MemoryMax` limits one below the root: only the root's files were read, so a synthetic
    split past the limit was killed by the kernel instead of refused. The limits of the
    process's own cgroup and of each above it count; a sibling's does not."""
    controller, names = list(hardware.CGROUPS.values())[version]
    membership = f"7:pids:/elsewhere\n{'4:memory' if controller else '0:'}:/job_7/step_0\n"
    unlimited = str(2**63 - 4096) if controller else "max"  # v1's "no limit", and v2's
    write_cgroup(tmp_path, names, unlimited, 5000, 0)
    write_cgroup(tmp_path / "job_7", names, "1000000", 600_000, 200_000)
    write_cgroup(tmp_path / "job_7" / "step_0", names, unlimited, 300_000, 0)
    write_cgroup(tmp_path / "job_8", names, "1000", 900, 0)  # a sibling: not this process's
    cgroups = {tmp_path: (controller, names)}
    assert min(hardware.cgroup_headrooms(cgroups, membership)) == 600_000
    # in the root cgroup (a container's own, under its cgroup namespace): the root's alone
    at_root = f"{'4:memory' if controller else '0:'}:/\n"
    assert hardware.cgroup_headrooms(cgroups, at_root) == ([2**63 - 4096 - 5000] if controller
                                                            else [])


def test_available_memory_is_at_most_what_the_system_has():
    system = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < hardware.available_memory() <= system


@pytest.mark.parametrize("n", [100, 37])
def test_synthetic_shapes_and_balanced_classes(n):
    images, labels, boxes = synthetic.make_split(n, seed=0)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (n,) and boxes.shape == (n, 4)
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1


def test_write_synthetic_is_a_cifar10_folder_with_balanced_training_classes(tmp_path):
    folder = python_folder.write_synthetic(tmp_path, 60, 20)
    assert folder == tmp_path / "synthetic-60-20-seed0"  # the name such folders always had
    data = cifar.read_folder(folder, layouts.OWN_LAYOUT, "synthetic")
    assert data.classes == SYNTHETIC_CLASSES
    assert np.bincount(data.train.labels).tolist() == [6] * 10
    assert data.train.images.shape == (60, 32, 32, 3) and len(data.test.labels) == 20
    assert python_folder.write_synthetic(tmp_path, 60, 20) == folder  # written once


def test_write_synthetic_refuses_too_few_images(tmp_path):
    with pytest.raises(DataError, match="--synthetic-size 9 5: .* at least 10 training images"):
        python_folder.write_synthetic(tmp_path, 9, 5)
    with pytest.raises(DataError, match="and 1 test image"):
        python_folder.write_synthetic(tmp_path, 10, 0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["synthetic", "folder"])
def test_a_damaged_folder_the_engine_wrote_is_to_be_deleted_not_downloaded(tmp_path, name):
    """A python folder the engine made (synthetic, or from image folders) is remade by the
    next run: its fix is to delete it, never the archive's 'download it again'."""
    folder = python_folder.write_synthetic(tmp_path, 10, 5)
    (folder / layouts.OWN_LAYOUT.test_files[0]).unlink()
    with pytest.raises(DataError) as refused:
        cifar.read_folder(folder, layouts.OWN_LAYOUT, name)
    assert str(refused.value).endswith(f"Delete {folder}; the next run makes it again.")


def test_load_refuses_an_unknown_dataset_before_making_its_data_dir(tmp_path):
    """cifar.load names the datasets it knows, and creates no data folder for another."""
    with pytest.raises(DataError, match="^Unknown dataset 'imagenet'; choose one of "
                                        f"{', '.join(DATASETS)}.$"):
        cifar.load("imagenet", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_synthetic_boxes_hold_the_object(tmp_path):
    """Each box lies in the image and holds the object: one flat colour, never outside it."""
    folder = python_folder.write_synthetic(tmp_path, 10, 200)
    images = cifar.read_folder(folder, layouts.OWN_LAYOUT, "synthetic").test.images
    boxes = synthetic_boxes(folder)
    assert boxes.shape == (200, 4)
    y0, x0, y1, x1 = boxes.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 32).all() and (x1 <= 32).all()
    assert ((y1 - y0) == synthetic.SHAPE_SIZE).all() and ((x1 - x0) == synthetic.SHAPE_SIZE).all()
    for image, (top, left, bottom, right) in zip(images, boxes, strict=True):
        inside = np.zeros((32, 32), bool)
        inside[top:bottom, left:right] = True
        colours, counts = np.unique(image[inside], axis=0, return_counts=True)
        colour = colours[counts.argmax()]
        assert counts.max() >= 40  # the object covers a good part of its 10 x 10 box
        assert not (image[~inside] == colour).all(-1).any()


# --- gaps a mutation audit found ------------------------------------------------------------


def test_float_labels_are_refused_naming_the_file(cifar10_dir):
    """Labels of 1.5 have the right shape and range; only their type shows they are no class
    indices (int64 would silently truncate them)."""
    path = cifar10_dir.folder / "data_batch_3"
    dump_pickle(path, _with(labels=np.array([0.0, 1.5, 2.0, 3.0])))
    assert_refused(cifar10_dir, path, "labels of shape (4,) and type float64; expected one "
                                      "integer label per image")


@pytest.mark.parametrize("layout", ["planes", "pixels"])
def test_image_arrays_as_python_3_writers_save_them_are_read(cifar10_dir, layout):
    """N x 3 x 32 x 32 (torch's layout) and N x 32 x 32 x 3 (PIL's, Keras's) hold the same
    pixels as the archive's N x 3072 rows: each is read as what it is, never reshaped."""
    for name in (*LAYOUT.train_files, *LAYOUT.test_files):
        path = cifar10_dir.folder / name
        batch = pickle.loads(path.read_bytes(), encoding="bytes")
        planes = batch[b"data"].reshape(-1, 3, 32, 32)
        batch[b"data"] = planes if layout == "planes" else planes.transpose(0, 2, 3, 1).copy()
        dump_pickle(path, batch, 4)
    data = read(cifar10_dir.folder)
    assert_splits_equal(data.train, cifar10_dir.train)
    assert_splits_equal(data.test, cifar10_dir.test)


def pictures(n: int, rng: np.random.Generator) -> cifar.Split:
    """n of loaders.synthetic's pictures: shapes over smoothly varying backgrounds."""
    images, labels, _ = synthetic.make_split(n, seed=int(rng.integers(1 << 31)))
    return cifar.Split(images, labels)


@pytest.mark.parametrize("make_split, refused, blank", [
    (pictures, True, False), (pictures, True, True), (random_split, False, False)],
    ids=["pictures", "pictures, one blank, one without blue", "noise"])
def test_pictures_flattened_pixel_by_pixel_are_refused(tmp_path, make_split, refused, blank):
    """N x 32 x 32 x 3 pictures flattened (x.reshape(len(x), -1)) have the shape of the
    archive's rows of planes, and read as planes were scrambled: refused with both ways to
    write them, by how alike vertically adjacent pixels are read either way, also where one
    image is blank (its flat planes tell nothing: the others still count) and one has no blue
    (flat read as pixels only, not as planes: it counts neither way, or its NaN let the
    scrambled batch through). The same pictures as planes are read; noise, as rough either
    way, cannot be told and is read."""
    made = write_cifar10(tmp_path, rows=(3, 2, 8, 1, 2), make_split=make_split)
    assert_splits_equal(read(made.folder).train, made.train)
    path = made.folder / "data_batch_3"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    pixels = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if blank:
        pixels[0] = 0
        pixels[1, ..., 2] = 0
    dump_pickle(path, {**batch, b"data": pixels.reshape(len(pixels), -1).copy()})
    if refused:
        assert_refused(made, path, "'data' holds rows that look like N x 32 x 32 x 3 images "
                                   "flattened pixel by pixel (x.reshape(len(x), -1)), not the "
                                   "archive's R, G and B planes: read as planes they would be "
                                   "scrambled. Save the images unflattened, or as planes: "
                                   "x.transpose(0, 3, 1, 2).reshape(len(x), -1).")
    else:
        assert len(read(made.folder).train.labels) == 16


def test_three_dimensional_data_is_refused_naming_the_file(cifar10_dir):
    """(4, 3072, 1) has 3072 values a row but is no batch of rows."""
    path = cifar10_dir.folder / "data_batch_1"
    dump_pickle(path, _with(data=np.zeros((4, layouts.ROW_SIZE, 1), np.uint8)))
    assert_refused(cifar10_dir, path, "'data' has shape (4, 3072, 1)")


def np_saved(array: np.ndarray) -> bytes:
    """What np.save writes of array (to a path, it would add .npy to the name)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# what users write in a batch's place, and the words after its path in the refusal: what it is and
# what to write instead (it was 'truncated or not a CIFAR python batch', and to delete the
# folder, theirs, to download CIFAR-10 again)
WRITTEN_OTHERWISE = {
    "torch.save": (lambda path, batch: torch.save(batch, path),
                   " is a zip archive (as torch.save writes), not a pickle: write it with "
                   "pickle.dump, its tensors as numpy arrays (tensor.numpy())."),
    "np.save": (lambda path, batch: path.write_bytes(np_saved(batch[b"data"])),
                " is a .npy file (as np.save writes), not a pickle: write a dict of its arrays "
                "with pickle.dump (docs/data.md)."),
    "tensors": (lambda path, batch: dump_pickle(
        path, {**batch, b"data": torch.from_numpy(batch[b"data"])}, 4),
        " holds torch tensors: pickle them as numpy arrays (tensor.numpy())."),
    "a list": (lambda path, batch: dump_pickle(path, {**batch, b"data": batch[b"data"].tolist()},
                                               4),
               ": 'data' must be a uint8 array, got a list; pixels of 0..255 convert with "
               "np.asarray(data, dtype=np.uint8). Delete"),
}


@pytest.mark.parametrize("case", WRITTEN_OTHERWISE)
def test_a_batch_written_otherwise_is_named_with_what_to_write(cifar10_dir, case):
    write, words = WRITTEN_OTHERWISE[case]
    path = cifar10_dir.folder / "data_batch_2"
    write(path, _good_batch())
    assert_refused(cifar10_dir, path, f"{path}{words}")


def test_a_refusal_in_a_folder_a_user_may_have_written_says_how_to_write_it_again(cifar10_dir):
    """Deleting the folder to download CIFAR-10 again was the only fix given: for a folder the
    user wrote, the loss of it."""
    path = cifar10_dir.folder / "data_batch_3"
    _truncate(path)
    assert_refused(cifar10_dir, path, f"Delete {cifar10_dir.folder} to download it again, or "
                   "replace the file from the original archive; a folder you wrote yourself: "
                   "write that file again as a pickled dict of numpy arrays (docs/data.md).")


def test_a_training_batch_past_the_fifth_is_refused_not_left_out(cifar10_dir):
    """A sixth batch written by hand was skipped without a word: its images never trained."""
    shutil.copyfile(cifar10_dir.folder / "data_batch_1", cifar10_dir.folder / "data_batch_6")
    (cifar10_dir.folder / "data_batch_notes").write_text("not numbered: not a batch")
    with pytest.raises(DataError) as refused:
        read(cifar10_dir.folder)
    assert str(refused.value) == (
        f"{cifar10_dir.folder} holds data_batch_6 beside data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5, the cifar10 training batches read; merge its "
        "images into those, or move it away.")


def test_fetch_extracts_a_placed_archive_without_downloading(tmp_path, closed_port):
    """An archive with the right md5 already in the data folder is used offline."""
    made = write_cifar10(tmp_path / "made")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = make_tar_gz(data_dir / ARCHIVE, made.folder)
    folder = download.fetch("cifar10", data_dir, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}",
                         md5=md5(archive))
    assert folder == data_dir / LAYOUT.folder
    data = read(folder)
    assert_splits_equal(data.train, made.train)
    assert_splits_equal(data.test, made.test)


def test_a_full_disk_while_extracting_keeps_the_good_archive(tmp_path, closed_port):
    """The archive passed its md5: a disk too small for its files is the folder's problem, and
    the advice was to delete the archive (a good one, downloaded again to fail again)."""
    made = write_cifar10(tmp_path / "made")
    padding = _member(f"{LAYOUT.folder}/padding")  # 2 MB of zeros: a few KB in the archive
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        archive = make_tar_gz(disk / ARCHIVE, made.folder, [(padding, bytes(2 << 20))])
        with pytest.raises(DataError) as refused:
            download.fetch("cifar10", disk, url=f"http://127.0.0.1:{closed_port}/{ARCHIVE}",
                           md5=md5(archive))
        assert str(refused.value).startswith(f"cannot extract {archive} into {disk}: No space "
                                             "left on device. It needs 2 MB there")
        assert "Delete" not in str(refused.value)
        assert [p.name for p in disk.iterdir()] == [ARCHIVE]  # no staging folder left


def test_synthetic_splits_never_share_images(tmp_path):
    """The test split is drawn from a seed of its own, so no test image is a training image.
    Equal split sizes make a shared seed show."""
    folder = python_folder.write_synthetic(tmp_path, 20, 20)
    assert folder.name == "synthetic-20-20-seed0"
    data = cifar.read_folder(folder, layouts.OWN_LAYOUT, "synthetic")
    splits = [{image.tobytes() for image in split.images} for split in (data.train, data.test)]
    assert len(set.union(*splits)) == sum(map(len, splits)) == 40  # no image in two splits


@pytest.mark.parametrize("empty", ["", "  "], ids=["empty", "blank"])
def test_prepare_refuses_an_empty_data_dir_and_writes_nothing(tmp_path, monkeypatch, empty):
    """A library caller's "" must not mean the current directory (Path("") is "."), nor its
    "  " a folder of two spaces there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as refused:
        prepare("synthetic", empty, synthetic_size=(20, 5), workers=1)
    assert str(refused.value).startswith("The data folder is empty ('')")
    assert list(tmp_path.iterdir()) == []


def test_prepare_cli_refuses_a_synthetic_size_for_another_dataset(tmp_path):
    """It was ignored: the command then fetched CIFAR-10 as if the size meant something."""
    result = run_script("loaders/prepare.py", "--dataset", "cifar10", "--synthetic-size", 100, 10,
                        "--data-dir", tmp_path / "data", timeout=120)
    assert result.returncode == 2 and result.stderr == (
        "python loaders/prepare.py: error: --synthetic-size is for --dataset synthetic, not "
        "cifar10; see --help\n")
    assert not (tmp_path / "data").exists()


def test_prepare_cli_prints_the_two_betons_of_the_size_asked_for(tmp_path, capsys):
    """`cifar-prepare` prints the training and test .beton paths, one a line, for a script to
    read; of the --synthetic-size given, not the default 50,000 and 10,000."""
    from loaders import prepare as prepare_cli

    data_dir = tmp_path / "data"
    assert prepare_cli.main(["--dataset", "synthetic", "--synthetic-size", "20", "5",
                             "--data-dir", str(data_dir)]) == 0
    made = prepare("synthetic", data_dir, synthetic_size=(20, 5), workers=1)  # already there
    assert capsys.readouterr().out == f"{made.train}\n{made.test}\n"
    assert [len(beton.read(path).labels) for path in (made.train, made.test)] == [20, 5]


def test_prepare_refuses_numba_settings_before_writing_anything(tmp_path):
    """Checked as FFCV was imported, after the synthetic source folder was written."""
    result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--synthetic-size", 100,
                        10, "--data-dir", tmp_path / "data", timeout=120,
                        env={**os.environ, "NUMBA_THREADING_LAYER": "foo"})
    assert result.returncode == 1 and result.stderr.startswith(
        "error: NUMBA_THREADING_LAYER='foo' is no threading layer numba (FFCV's compiler) knows")
    assert not (tmp_path / "data").exists()

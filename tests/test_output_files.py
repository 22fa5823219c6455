"""Writing a command's files safely: atomic writes (all new or all old, fsynced, through
links, never over a device), the errors of a failed write, the folders made for --out and
taken away on a failure, the run folder's lock and the data's waiting lock, the sweep of
killed writers' temporaries, and an epoch's files written together. In-process on real
files, with a small tmpfs standing in for a full disk."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import resource
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ended_pid, run_code, tmpfs, wait_until, without_root_powers

from common import temporaries
from common.atomic import atomic_writes, csv_text, write_failed, write_text
from common.errors import CheckpointError, OutputError, ReportError
from common.locks import locked_dir, waiting_lock
from common.output_folders import made_for, make_dir, output_dir
from common.paths import long_name
from common.temporaries import (
    sweep_dead_writers,
    sweep_temporaries,
    temporary_name,
    temporary_writer,
)
from engine import checkpoint
from engine.history import read_history


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path):
    """write() on a full disk raises ENOSPC naming no file; the one-line error must name it."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        with pytest.raises(OSError) as raised:
            write_text(disk / "metrics.csv", "x" * (1 << 20))
        assert raised.value.errno == 28 and raised.value.filename == str(disk / "metrics.csv")
        assert list(disk.iterdir()) == []  # no temporary left behind


def test_a_failed_write_names_its_option_and_the_fix_and_an_inputs_error_stays_its_own(
        tmp_path):
    """write_failed: a full disk or a spent quota (EDQUOT: a cluster's /home) is said to be
    full; an error naming a file in --out, or in the temporary beside it where a report is
    made first, names --out and the fix; past the file size limit, the limit, not the folder;
    one naming a file elsewhere (an input) is raised as it was."""
    out = tmp_path / "report"
    for code in (errno.ENOSPC, errno.EDQUOT):
        error = write_failed(OSError(code, os.strerror(code)), out, "--cam", "the overlays")
        assert isinstance(error, ReportError) and str(error) == (
            f"--cam {out}: its disk is full, so the overlays could not be written (nothing was "
            "left there); free some space or choose another --cam.")
    for where in (out / "index.html", temporary_name(out) / "index.html"):
        error = write_failed(OSError(errno.EROFS, "Read-only file system", str(where)), out)
        assert isinstance(error, ReportError) and str(error) == (
            f"--out {out}: the report could not be written there (Read-only file system); "
            "choose a writable --out.")
    # no free space would help past this process's file size limit: raising it would
    error = write_failed(OSError(errno.EFBIG, "File too large"), out, "--cam", "the overlays")
    assert isinstance(error, ReportError) and str(error) == (
        f"--cam {out}: the overlays could not be written, as it passes this process's file size "
        "limit (nothing was left there); raise this process's file size limit (`ulimit -f "
        "unlimited`).")
    # a report's --out (the defaults) too: 'choose a writable --out' would send the user to
    # another folder, past the same limit
    assert str(write_failed(OSError(errno.EFBIG, "File too large"), out)) == str(error).replace(
        f"--cam {out}: the overlays", f"--out {out}: the report")
    elsewhere = OSError(errno.EIO, "Input/output error", str(tmp_path.parent / "ckpt.pt"))
    assert write_failed(elsewhere, out) is elsewhere


def test_files_written_together_are_all_new_or_all_old_on_a_full_disk(tmp_path):
    """lr_find's table and plot: the plot not fitting leaves the old table, not a new table
    beside an old plot; written in full, both are new."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        table, plot = disk / "lr_find.csv", disk / "lr_find.png"
        table.write_text("old table")
        plot.write_text("old plot")
        with pytest.raises(OSError) as raised:
            atomic_writes({table: lambda tmp: tmp.write_text("new table"),
                           plot: lambda tmp: tmp.write_bytes(b"x" * (1 << 20))})
        assert raised.value.errno == 28 and raised.value.filename == str(plot)
        assert (table.read_text(), plot.read_text()) == ("old table", "old plot")
        assert sorted(p.name for p in disk.iterdir()) == ["lr_find.csv", "lr_find.png"]
        atomic_writes({table: lambda tmp: tmp.write_text("new table"),
                       plot: lambda tmp: tmp.write_text("new plot")})
        assert (table.read_text(), plot.read_text()) == ("new table", "new plot")


# python -c this: Ctrl-C (SIGINT) arrives as the first of two renames ends
CTRL_C_AMID_RENAMES = """
import os, signal, sys
from pathlib import Path
from common import atomic
signal.signal(signal.SIGINT, signal.default_int_handler)  # a command typed at a terminal
table, plot = Path(sys.argv[1]), Path(sys.argv[2])
table.write_text("old table"); plot.write_text("old plot")
replace = os.replace
def replace_then_ctrl_c(source, target):
    replace(source, target)
    os.kill(os.getpid(), signal.SIGINT)
atomic.os.replace = replace_then_ctrl_c
try:
    atomic.atomic_writes({table: lambda tmp: tmp.write_text("new table"),
                          plot: lambda tmp: tmp.write_text("new plot")})
except KeyboardInterrupt:
    print("interrupted:", table.read_text(), "and", plot.read_text())
"""


def test_ctrl_c_between_two_renames_waits_for_the_second(tmp_path):
    """compare's table and plot, renamed one after the other in the main thread: a Ctrl-C
    after the first rename left a new table beside an old plot. It waits for the second."""
    result = run_code(CTRL_C_AMID_RENAMES, tmp_path / "compare.csv", tmp_path / "compare.png")
    assert result.stdout == "interrupted: new table and new plot\n", result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.csv", "compare.png"]


def test_a_device_or_pipe_is_never_renamed_over(tmp_path):
    """A rename over /dev/null made it a plain file for the whole machine (export --out and
    bench --json did so as root): a pipe stands in for the device, refused before any write."""
    table, pipe = tmp_path / "table.csv", tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OutputError) as refused:
        atomic_writes({table: lambda tmp: tmp.write_text("new table"),
                       pipe: lambda tmp: tmp.write_text("new plot")})
    # not 'Name a file.': lr_find's file names are its own, no option names them
    assert str(refused.value) == (f"{pipe} is a device, pipe or socket, not a file; writing it "
                                  "would replace that. Move it away, or write elsewhere.")
    assert stat.S_ISFIFO(pipe.stat().st_mode) and sorted(tmp_path.iterdir()) == [pipe]


def test_files_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Renamed unsynced, a checkpoint could be empty after a power loss (XFS): every file is
    fsynced as its temporary, before any rename, and its folder after the renames."""
    synced_paths, fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync, noting the path it was given
        synced_paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    table, plot = tmp_path / "table.csv", tmp_path / "plot.png"
    atomic_writes({table: lambda tmp: tmp.write_text("table"),
                   plot: lambda tmp: tmp.write_text("plot")})
    assert synced_paths == [str(temporary_name(table)), str(temporary_name(plot)), str(tmp_path)]
    assert (table.read_text(), plot.read_text()) == ("table", "plot")


def test_a_symbolic_link_is_written_through_and_a_dangling_one_refused(tmp_path):
    """bench --json, lr_find's files, a run's metrics: a temporary renamed over a link made the
    link a plain file, and the file it led to (on another disk, say) stayed old. Written
    through now, as open() and cp write; a link that leads nowhere is refused, as cp does."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "bench.json").write_text("old")
    link, dead = tmp_path / "bench.json", tmp_path / "dead.json"
    link.symlink_to(shared / "bench.json")
    dead.symlink_to("gone/bench.json")
    atomic_writes({link: lambda tmp: tmp.write_text("new")})
    assert link.is_symlink() and (shared / "bench.json").read_text() == "new"
    with pytest.raises(OutputError) as refused:
        atomic_writes({dead: lambda tmp: tmp.write_text("new")})
    assert str(refused.value) == (f"{dead} is a symbolic link that cannot be followed (to "
                                  "gone/bench.json: its links loop or lead nowhere); point it at "
                                  "a path that exists, or remove it.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "dead.json", "shared"]
    assert [p.name for p in shared.iterdir()] == ["bench.json"]


def test_a_failed_rename_names_the_file_not_its_temporary(tmp_path):
    """The plot's place is taken by a folder while the files are written: its rename fails,
    and the error named the temporary ('.plot.png.<pid>.tmp'), which means nothing to the
    user. The table, renamed before it, is new; no temporary is left."""
    table, plot = tmp_path / "table.csv", tmp_path / "plot.png"
    with pytest.raises(IsADirectoryError) as raised:
        atomic_writes({table: lambda tmp: tmp.write_text("new table"),
                       plot: lambda tmp: (tmp.write_text("new plot"), plot.mkdir())})
    assert raised.value.filename == str(plot) and raised.value.filename2 is None
    assert table.read_text() == "new table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "table.csv"]


def test_a_failed_command_leaves_none_of_the_folders_made_for_its_out(tmp_path):
    """--out a/b/c, none of them there: a failure takes all three away again; a folder that
    holds something by then stays, and so do the folders above it."""
    with pytest.raises(KeyboardInterrupt), output_dir(tmp_path / "a" / "b" / "c"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError), output_dir(tmp_path / "a" / "b" / "c"):
        (tmp_path / "a" / "note.txt").write_text("not ours to remove")
        raise ValueError
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["note.txt"]


def test_folders_made_for_an_out_found_unwritable_are_taken_away_again(tmp_path):
    """output_dir on a full disk: --out a/b is made (a folder takes no space on a tmpfs), then
    found unwritable; the refusal names it and leaves neither folder behind."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        with pytest.raises(OSError), open(disk / "filler", "wb") as filler:
            while True:  # the disk filled to its last byte
                filler.write(b"x" * 4096)
                filler.flush()
        with pytest.raises(OutputError) as refused, output_dir(disk / "a" / "b"):
            pass
        assert str(refused.value) == (f"--out {disk / 'a' / 'b'} cannot be written (No space "
                                      "left on device); choose a writable folder.")
        assert [p.name for p in disk.iterdir()] == ["filler"]


def test_the_folders_made_for_a_file_are_made_and_a_file_among_them_is_named(tmp_path):
    """made_for: --out a/b/x.onnx, a and b missing, makes both (and takes them again on a
    failure); f/a/x.onnx, f a file, names f, not the folders still to make."""
    with made_for(tmp_path / "a" / "b" / "x.onnx"):
        assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ValueError), made_for(tmp_path / "c" / "d" / "x.onnx"):
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError) as refused, made_for(tmp_path / "f" / "a" / "x.onnx", "--to"):
        pass
    assert str(refused.value) == (f"--to {tmp_path}/f/a/x.onnx: {tmp_path}/f is a file, not a "
                                  "folder; choose another --to.")


def test_the_folder_lock_is_exclusive_and_a_failure_leaving_it_empty_removes_it(tmp_path):
    """A second lock on a held folder is refused naming the holder's process and the fix; a
    folder the failed block left empty goes, and one it wrote into stays without its .lock."""
    out = tmp_path / "new"
    with pytest.raises(OutputError) as refused, locked_dir(out):
        assert out.is_dir()
        with locked_dir(out):
            pass
    assert str(refused.value) == (f"{out} is in use by another run (process {os.getpid()}); "
                                  "wait for it to finish, or use another --out.")
    assert not out.exists()  # nothing was written into it: no trace of the failed run
    (tmp_path / "kept").mkdir()
    with locked_dir(tmp_path / "kept"):
        (tmp_path / "kept" / "file").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["file"]


def test_a_folder_that_existed_empty_is_kept(tmp_path):
    """Only a folder locked_dir made is removed when left empty: a user's own empty --out
    stays."""
    folder = tmp_path / "premade"
    folder.mkdir()
    with locked_dir(folder):
        pass
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_stale_longer_lock_file_is_overwritten_with_our_pid(tmp_path):
    """A lock file a dead run left (flocks die with it) is reused: it must then name this
    process alone, not our pid over the tail of the old one."""
    (tmp_path / ".lock").write_text("99999999")
    with locked_dir(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_a_refused_lock_leaves_no_descriptor_open(tmp_path):
    """A process that goes on after a refusal (tools/compare.py trains several runs in one)
    kept each refused lock file open."""
    out = tmp_path / "out"
    with locked_dir(out):
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(OutputError, match="in use by another run"), locked_dir(out):
                pass
        assert sorted(os.listdir("/proc/self/fd")) == before


def blocked_on(lock: Path) -> None:
    """Wait until some flock waits for the file now at `lock` (a '->' line of /proc/locks)."""
    inode = f":{lock.stat().st_ino} "
    wait_until(lambda: any("->" in line and inode in line
                           for line in Path("/proc/locks").read_text().splitlines()),
               60, f"nothing ever waited for {lock}", interval=0.01)


def test_a_waiter_that_finds_the_lock_taken_again_says_it_waits_once(tmp_path):
    """The holder lets go, and another process takes the new lock file first: the waiter
    goes on waiting, but said so (on_wait: 'waiting for ... to prepare the data') again."""
    lock, waits, inside = tmp_path / ".lock", [], threading.Event()
    first = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(first, fcntl.LOCK_EX)

    def waiter() -> None:
        with waiting_lock(lock, lambda: waits.append("waiting")):
            inside.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        blocked_on(lock)
        lock.unlink()  # as a holder leaves: its file removed, then let go
        third = os.open(lock, os.O_CREAT | os.O_RDWR)  # a third process, first to the new one
        fcntl.flock(third, fcntl.LOCK_EX)
        os.close(first)
        blocked_on(lock)  # the waiter, woken on the removed file, now waits for the new one
        os.close(third)
        assert inside.wait(timeout=60)
    finally:
        thread.join(timeout=60)
    assert waits == ["waiting"]


def test_another_users_lock_file_that_we_may_only_read_is_still_locked(tmp_path):
    """A shared data folder's .prepare.lock left by another user (mode 0644 there): opening it
    for writing is refused, so it is flocked read-only."""
    lock = tmp_path / ".lock"
    lock.write_text("4242")
    lock.chmod(0o444)  # not ours to write, as another user's is (for root, without its powers)
    code = ("import sys; from pathlib import Path; from common.locks import waiting_lock\n"
            "with waiting_lock(Path(sys.argv[1]), lambda: None):\n    print('held')")
    result = subprocess.run(without_root_powers([sys.executable, "-c", code, str(lock)]),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "held\n", result.stderr[-2000:]


def test_a_run_folder_made_read_only_mid_run_ends_the_lock_without_an_error(tmp_path):
    """The lock file of a run folder made read-only while the run held it (a user's chmod, a
    share remounted) cannot be removed: it stays (its flock dies with the process), where the
    run that had finished failed on its removal (PermissionError)."""
    out = tmp_path / "run"
    code = ("import os, sys; from pathlib import Path; from common.locks import locked_dir\n"
            "out = Path(sys.argv[1])\n"
            "with locked_dir(out):\n    os.chmod(out, 0o555)\nprint('done')")
    result = subprocess.run(without_root_powers([sys.executable, "-c", code, str(out)]),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    out.chmod(0o755)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_lock_freed_while_a_process_waits_is_taken_at_its_path_not_on_the_removed_file(
        tmp_path):
    """A holder removes the lock file as it lets go: a waiter that wakes holding the removed
    file must lock the file now at the path, else a third process takes that one at once and
    two prepare (or write) the same data together."""
    lock, waiting, inside, leave = tmp_path / ".lock", threading.Event(), threading.Event(), \
        threading.Event()

    def waiter() -> None:
        with waiting_lock(lock, waiting.set):
            inside.set()
            leave.wait(timeout=60)

    class Busy(Exception):
        pass

    def refuse() -> None:
        raise Busy

    thread = threading.Thread(target=waiter)
    with waiting_lock(lock, lambda: None):
        thread.start()
        assert waiting.wait(timeout=60)  # the waiter opened the file this holder removes
    try:
        assert inside.wait(timeout=60)
        with pytest.raises(Busy), waiting_lock(lock, refuse):
            pass  # a third process found the lock free while the waiter held it
    finally:
        leave.set()
        thread.join(timeout=60)


def test_only_a_writers_temporaries_of_the_kinds_asked_for_are_named_its():
    """sweep_dead_writers removes the folders temporary_writer names: `.report.<pid>.<other>` (a
    user's own folder) is none of them, and is never removed."""
    out = Path("runs") / "report"
    assert temporary_writer(Path("runs/.report.123.tmp"), out, ("tmp", "old")) == 123
    assert temporary_writer(Path("runs/.report.123.old"), out, ("tmp", "old")) == 123
    for name in (".report.123.keep", ".report.123", ".report.x1.tmp", ".other.123.tmp",
                 "123.tmp"):  # a user's own folder, named as a pid's temporary is, unhidden
        assert temporary_writer(Path("runs") / name, out, ("tmp", "old")) is None, name


def test_a_sweep_removes_the_temporaries_of_dead_writers_and_of_this_pid_only(tmp_path):
    """What a dead process left goes, and so does what this PID left (a PID reused after a
    restart: no write of this process is under way at a sweep); a live writer's stays."""
    ended, alive = ended_pid(), os.getppid()
    for pid in (os.getpid(), ended, alive):
        (tmp_path / f".report.{pid}.tmp").mkdir()
    sweep_dead_writers(tmp_path / "report")
    assert [p.name for p in tmp_path.iterdir()] == [f".report.{alive}.tmp"]


def test_another_users_live_writer_counts_as_alive():
    """A shared --out (a lab's report folder) may hold a temporary of another user's running
    report: signalling their process is refused (PermissionError), which says it runs; taken
    for dead, its half-made report was swept from under it. Here as nobody, of PID 1's. The
    module's source goes in with the code: nobody may not read this checkout (a clone in
    mktemp's folder, 0700)."""
    code = Path(temporaries.__file__).read_text() + "\nprint(writer_alive(1))\n"
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root may signal anyone: be another user
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to run as another user")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=60)
    assert result.stdout == "True\n", result.stderr[-2000:]


def test_a_sweep_of_temporary_files_removes_files_only_and_of_the_name_asked_for(tmp_path):
    """sweep_temporaries (a run's --out, a .beton's folder) removes the `.<name>.<pid>.tmp`
    files killed writes left; a folder named so is a user's, kept whole (unlinking it failed,
    and the run with it), and a name other than the one asked for is left too. A name with
    glob's characters is its own (a `[` matched none of its temporaries)."""
    ended = ended_pid()  # a writer that is gone
    for name in (f".ckpt.pt.{ended}.tmp", f".train.beton.{ended}.tmp",
                 f".r[1].beton.{os.getpid()}.tmp", "ckpt.pt"):
        (tmp_path / name).write_bytes(b"half a file")
    (tmp_path / f".notes.{ended}.tmp").mkdir()
    (tmp_path / f".notes.{ended}.tmp" / "mine.txt").write_text("kept")
    sweep_temporaries(tmp_path, "train.beton")
    sweep_temporaries(tmp_path, "r[1].beton")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".ckpt.pt.{ended}.tmp", f".notes.{ended}.tmp", "ckpt.pt"]
    sweep_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".notes.{ended}.tmp", "ckpt.pt"]
    assert (tmp_path / f".notes.{ended}.tmp" / "mine.txt").read_text() == "kept"


def test_a_sweep_of_temporary_files_keeps_a_live_writers(tmp_path):
    """A resumed run sweeps its folder, where tools/export.py may be writing
    `.best.onnx.<pid>.tmp` beside the checkpoints: deleted, the export failed on a missing
    file. A live writer's temporary stays; a dead one's and this PID's go."""
    ended = ended_pid()
    alive = os.getppid()
    for pid in (alive, ended, os.getpid()):
        (tmp_path / f".best.onnx.{pid}.tmp").write_bytes(b"an export under way")
    sweep_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".best.onnx.{alive}.tmp"]


def test_a_name_whose_temporary_just_fits_is_taken_and_one_byte_longer_is_not(tmp_path):
    """long_name refuses a name only when its temporary (a few bytes longer) passes the file
    system's limit, not when it reaches it."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    extra = len(temporary_name(tmp_path / "a").name) - 1
    assert long_name(tmp_path / ("a" * (limit - extra))) is None
    assert long_name(tmp_path / ("a" * (limit - extra + 1))) == (
        f"its name is too long ({limit - extra + 1} bytes; this file system takes {limit}, "
        f"less {extra} for the temporary it is written as first)")


def test_make_dir_refuses_a_folder_that_exists_but_cannot_be_written(read_only_dir):
    """An existing --out that takes no file is refused by make_dir, before any work."""
    with pytest.raises(OutputError) as refused:
        make_dir(read_only_dir, "--out")
    assert str(refused.value).startswith(f"--out {read_only_dir} cannot be written (")
    assert str(refused.value).endswith("); choose a writable folder.")


def test_make_dir_names_the_file_or_pipe_standing_where_a_folder_belongs(tmp_path):
    """mkdir says only 'File exists' or 'Not a directory': an --out that is a file or a pipe,
    or is under a file, is refused naming that file (under one, the message named neither),
    and nothing is made."""
    afile, pipe = tmp_path / "afile", tmp_path / "pipe"
    afile.write_text("not a folder")
    os.mkfifo(pipe)
    fix = "; choose a writable folder."
    for path, message in {afile: f"--out {afile} is a file, not a folder{fix}",
                          afile / "a" / "b": f"--out {afile}/a/b: {afile} is a file, not a "
                                             f"folder{fix}",
                          pipe: f"--out {pipe} is a device, pipe or socket, not a folder{fix}",
                          }.items():
        with pytest.raises(OutputError) as refused:
            make_dir(path)
        assert str(refused.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "pipe"]


def epoch_files(epoch: int, resume_bytes: int) -> dict:
    """A checkpoint dict as checkpoint.write_epoch takes it, its training state this big."""
    row = dict(epoch=epoch, train_loss=1.0 / epoch, test_acc=0.5)
    return dict(epoch=epoch, history=[dict(row, epoch=e) for e in range(1, epoch + 1)],
                config=dict(epochs=3), state_dict={"w": torch.full((8,), float(epoch))},
                resume=dict(optimizer=torch.zeros(resume_bytes // 4)))


def test_an_epoch_that_cannot_be_written_leaves_the_previous_epochs_files_whole(tmp_path):
    """best.pt, ckpt.pt, the metrics and config.json are renamed into place together: when
    ckpt.pt does not fit, the new best.pt (written first) is not kept beside the old ckpt.pt."""
    with tmpfs(tmp_path / "disk", "size=256k") as out:
        checkpoint.write_epoch(out, epoch_files(1, 1024), best=True)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert sorted(before) == ["best.pt", "ckpt.pt", "config.json", "metrics.csv",
                                  "metrics.jsonl"]
        with pytest.raises(CheckpointError) as refused:
            checkpoint.write_epoch(out, epoch_files(2, 300_000), best=True)
        message = str(refused.value)
        del refused  # its traceback holds torch's writer, whose open file keeps the disk busy
        gc.collect()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries
    assert message.startswith(f"could not write {out / 'ckpt.pt'} (")
    assert ("); the previous epoch's files are intact. Free some space and continue with "
            "--resume.") in message


def test_an_epoch_that_is_not_the_best_keeps_the_earlier_best_pt(tmp_path):
    """best=False writes the epoch's ckpt.pt and metrics but leaves best.pt the best epoch's,
    without the training state; a run whose first epoch is not the best has none yet."""
    checkpoint.write_epoch(tmp_path, epoch_files(1, 64), best=False)
    assert not (tmp_path / "best.pt").exists() and (tmp_path / "ckpt.pt").is_file()
    checkpoint.write_epoch(tmp_path, epoch_files(2, 64), best=True)
    checkpoint.write_epoch(tmp_path, epoch_files(3, 64), best=False)
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "ckpt.pt"))
    assert (best["epoch"], last["epoch"]) == (2, 3) and "resume" not in best and "resume" in last
    assert [row["epoch"] for row in read_history(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("code, limited, fix", [
    (errno.ENOSPC, True, "Free some space"), (errno.EDQUOT, True, "Free some space"),
    (errno.EFBIG, True, "Raise this process's file size limit (`ulimit -f unlimited`)"),
    (None, False, "Free some space"),
    (None, True, "Raise this process's file size limit (`ulimit -f unlimited`) or free some "
                 "space"),
    (errno.EACCES, True, "Make {folder} writable")],
    ids=["ENOSPC", "EDQUOT", "EFBIG", "torch's RuntimeError", "torch's, under ulimit -f",
         "EACCES"])
def test_a_file_that_could_not_be_written_gets_the_fix_its_error_asks_for(tmp_path, code,
                                                                          limited, fix):
    """torch's writer names no errno: a file size limit, where this process has one (the
    soft limit set here, whatever the host's), is named beside free space."""
    path = tmp_path / "ckpt.pt"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    unlimited = hard == resource.RLIM_INFINITY
    if not (limited or unlimited):
        pytest.skip("this host's hard file size limit leaves no process unlimited")
    resource.setrlimit(resource.RLIMIT_FSIZE, (
        (2**62 if unlimited else hard) if limited else resource.RLIM_INFINITY, hard))
    try:
        error = checkpoint.unwritten(path, OSError(code, "why", str(path)), None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(error).startswith(f"could not write {path} (why); nothing was written. "
                                 f"{fix.format(folder=tmp_path)} (or choose another --out)")


def test_metrics_csv_has_every_column_when_older_rows_lack_one():
    """History rows of a checkpoint from before a column came (eval_seconds, say) beside new
    ones: DictWriter refused them (a traceback, and a run that could never be resumed)."""
    rows = [dict(epoch=1, test_acc=0.5), dict(epoch=2, test_acc=0.6, eval_seconds=1.5)]
    assert csv_text(rows).splitlines() == ["epoch,test_acc,eval_seconds", "1,0.5,", "2,0.6,1.5"]


def test_text_files_are_written_in_utf8_whatever_the_locale(tmp_path):
    """A report's per-class table names classes as their folders do ('café'): under a locale
    whose encoding is not UTF-8 (ASCII here, latin-1 elsewhere) the write raised a
    UnicodeEncodeError and a traceback, or wrote bytes another machine reads otherwise."""
    code = ("import sys; from pathlib import Path; from common.atomic import write_csv; "
            "write_csv(Path(sys.argv[1]), [{'class': 'caf\\u00e9', 'accuracy': 0.5}])")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT)}
    table = tmp_path / "per_class.csv"
    result = subprocess.run([sys.executable, "-c", code, table], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert table.read_bytes() == "class,accuracy\r\ncafé,0.5\r\n".encode()

"""Two "machines" of one process each, started as a user starts them on two nodes (torchrun
with a rendezvous on 127.0.0.1): each node prepares the data once, only the global main process
writes the run folder, nothing is counted twice, and a run resumes on the same two nodes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_until

from engine import checkpoint, launch

pytestmark = pytest.mark.slow
TINY = ["--dataset", "synthetic", "--synthetic-size", "301", "151", "--width", "8",
        "--batch-size", "128", "--loader", "resident", "--seed", "1"]


def two_nodes(*args, second: tuple = (), timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """engine/train.py on two nodes of one process each, the second with `second` after
    `args`; both nodes' results."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
         "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
         str(port), str(ROOT / "engine" / "train.py"), *TINY, *map(str, args),
         *map(str, second if rank else ())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def test_two_nodes_train_once_write_once_and_resume(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    # the second node's --out stands for the same path on a disk of its own (a node-local
    # scratch): the global main process alone writes a run folder
    own_disk = tmp_path / "second-node" / "run"
    nodes = two_nodes("--data-dir", data, "--epochs", "1", "--out", out,
                      second=("--out", own_disk))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
        # accelerate's word on threads it set, which share_cores sets again (no OMP_NUM_THREADS
        # from torchrun at one process a node)
        assert "OMP_NUM_THREADS/MKL_NUM_THREADS unset" not in node.stderr, node.stderr[-3000:]
        # the second node's first process prepares after the first node's is done (and finds
        # the files made), not beside it, waiting on the data folder's lock
        assert "waiting for another process preparing" not in node.stderr, node.stderr[-3000:]
    assert sum(node.stdout.count("best test accuracy") for node in nodes) == 1
    assert not own_disk.parent.exists()
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["processes"] == 2
    row = ckpt["history"][0]
    assert row["train_images"] == 302  # every sample once, plus one of padding
    assert row["test_images"] == 151  # evaluated once each across the nodes
    assert len(list(data.glob("*.beton"))) == 2  # one train and one test file, made once
    assert not list(Path(data).glob(".*.tmp"))

    nodes = two_nodes("--resume", out, "--epochs", "2")
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    history = checkpoint.load(out / "ckpt.pt")["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == row


# python -c this script args: engine/train.py, saying after 1 s (not a minute) that it waits
NOTICE_AFTER_1_S = """
import runpy, sys
from engine import launch
launch.RENDEZVOUS_NOTICE_S = 1.0
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_node_waiting_for_a_peer_that_never_comes_says_so_and_stops_on_a_signal(tmp_path,
                                                                                  signum, code):
    """Rank 0 of two started by hand (srun-style variables), its peer never started: it waits
    in torch.distributed's rendezvous, inside C++, where Python's handlers never ran, in
    silence until torch's timeout (half an hour), and Ctrl-C or SIGTERM did nothing until a
    SIGKILL. Now it says what it waits for (after RENDEZVOUS_NOTICE_S), and stops."""
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with subprocess.Popen([sys.executable, "-c", NOTICE_AFTER_1_S,
                           str(ROOT / "engine" / "train.py"), *TINY, "--out", str(out)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            def listening() -> bool:
                """Rank 0 serves the rendezvous's store: listening, it waits for rank 1."""
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port)) == 0

            wait_until(listening, 120, "rank 0 never listened for its peer", process=proc,
                       interval=0.2)
            time.sleep(2)
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()  # where the signal did nothing
    assert proc.returncode == code and stderr.splitlines()[-1] == "interrupted", stderr
    said = [line for line in stderr.splitlines() if line]  # "interrupted" begins a new line
    assert said[-2] == (
        f"notice: process 0 of 2 has waited 1 s for the other processes of this run to meet "
        f"at MASTER_ADDR='127.0.0.1' MASTER_PORT='{port}'; one whose command failed before it "
        "joined, or that was never started, leaves the others waiting until torch's timeout "
        "(30 minutes by default, 10 with NCCL): check the other machines' output, or stop with "
        "Ctrl-C."), stderr
    assert "Traceback" not in stderr and not out.exists()


def test_the_waiting_notice_comes_once_and_only_while_the_rendezvous_still_waits(monkeypatch,
                                                                                  capsys):
    """said_while_waiting on its own: a rendezvous over in time says nothing, then or later
    (mid-training); one still waiting says so once; the other processes of a machine leave it
    to its first; a run of one process, which meets no one, says nothing however long."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launch, "RENDEZVOUS_NOTICE_S", 0.3)
    with launch.said_while_waiting():
        pass
    time.sleep(0.6)
    assert capsys.readouterr().err == ""
    with launch.said_while_waiting():
        time.sleep(0.6)
    assert capsys.readouterr().err.startswith(
        "notice: process 1 of 2 has waited 0.3 s for the other processes of this run to meet at "
        "MASTER_ADDR='10.0.0.1' MASTER_PORT='29500'; ")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with launch.said_while_waiting():
        time.sleep(0.6)
    assert capsys.readouterr().err == ""
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)  # one process: nothing to wait for
    with launch.said_while_waiting():
        time.sleep(0.6)
    assert capsys.readouterr().err == ""


def test_a_master_port_another_program_holds_is_named(tmp_path):
    """Rank 0 started by hand (srun-style variables) serves the rendezvous's store at
    MASTER_PORT: a port another program listens on ended in torch's DistNetworkError
    traceback (EADDRINUSE)."""
    out = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, str(ROOT / "engine" / "train.py"), *TINY,
                                 "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: process 0 cannot serve the run's rendezvous at MASTER_ADDR='127.0.0.1' "
        f"MASTER_PORT='{port}': the port is in use (by another run, or another program); set "
        "MASTER_PORT to a free port, the same on every process of this run.")
    assert "Traceback" not in result.stderr and not out.exists()

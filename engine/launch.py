"""The run's processes as a launcher started them (torchrun, accelerate launch, mpirun, or by
hand): the Accelerator that joins them, each one's share of the CPU, leaving their process
group, and what a launcher's settings that cannot work mean, said in one line each."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from common.errors import TrainingError, one_line
from common.hardware import (
    first_of_machine,
    launched,
    launched_processes,
    local_share,
    native_bf16,
    physical_cores,
    positive_count,
)
from common.stop_signals import stop_signals_end_at_once
from common.streams import error_line
from common.wording import noun
from engine.config import TrainConfig, resolve

# what torchrun and accelerate launch set, besides accelerate's own ACCELERATE_*
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")
# what accelerate reads besides them: OMP_NUM_THREADS with int() in a multi-process CPU run
ACCELERATE_READS = (*LAUNCH_VARIABLES, "OMP_NUM_THREADS")
# ours: processes started together meet within seconds; after this long, the wait is said
RENDEZVOUS_NOTICE_S = 60.0


def resolved_here(cfg: TrainConfig) -> TrainConfig:
    """cfg with what it leaves to the machine (loader, precision, compile mode, ...) chosen for
    this one (engine.config.resolve)."""
    return resolve(cfg, torch.cuda.is_available(), bf16=native_bf16())


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The accelerator of a resolved config: device placement, processes, trackers.

    Mixed precision is ours (Run.autocast), not accelerate's: one process can then build
    runs of different precisions (tools/bench.py), and `accelerate launch --mixed_precision`
    cannot apply a second autocast on top of --precision.
    """
    cuda = torch.cuda.is_available()
    if cfg.precision == "fp16" and not cuda:
        raise TrainingError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU.")
    if not cuda and (problem := restarts_refused(cfg.out)):
        raise TrainingError(problem)
    try:
        # cpu=True is what makes accelerate use gloo for multi-process CPU runs (torchrun);
        # compiling is ours too (--compile): `accelerate launch --dynamo_backend` compiled the
        # model behind a run whose header and config.json said eager. With several
        # processes this is their rendezvous, which waits in C++ for every one of them
        with stop_signals_end_at_once(), said_while_waiting(), warnings.catch_warnings():
            # its "OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at N" of a multi-process
            # CPU run: share_cores below sets the threads, and the run's header says how many
            warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset")
            accelerator = Accelerator(cpu=not cuda, log_with=cfg.log_with,
                                      project_dir=cfg.out, mixed_precision="no",
                                      dynamo_backend="no")
    except ValueError as error:  # an unknown tracker, or a launcher's variable it cannot read
        raise TrainingError(f"{error}{unread_variable(error)}") from None
    except torch.distributed.DistNetworkError as error:  # rank 0 could not serve the store
        raise TrainingError(store_failed(error)) from None
    if not cuda:  # after Accelerator: under mpirun it is what sets WORLD_SIZE and LOCAL_...
        share_cores()
    return accelerator


@contextmanager
def said_while_waiting() -> Iterator[None]:
    """A notice, from the first process of each machine, if the block (the rendezvous of a run
    of several processes) still waits after RENDEZVOUS_NOTICE_S: torch waits in silence until
    its own timeout for a process whose command failed before joining, or never started."""
    processes = launched_processes()
    if processes < 2 or not first_of_machine():
        yield
        return
    notice = threading.Timer(RENDEZVOUS_NOTICE_S, error_line, (
        f"notice: process {os.environ.get('RANK', '0')} of {processes} has waited "
        f"{RENDEZVOUS_NOTICE_S:g} s for the other processes of this run to meet at "
        f"{rendezvous_address()}; "
        "one whose command failed before it joined, or that was never started, leaves the "
        "others waiting until torch's timeout (30 minutes by default, 10 with NCCL): check the "
        "other machines' output, or stop with Ctrl-C.",))
    notice.daemon = True
    notice.start()
    try:
        yield
    finally:
        notice.cancel()


def unread_variable(error: ValueError) -> str:
    """Which environment variable accelerate could not read, for its error, whose message
    gives the value only ("invalid literal for int() with base 10: 'abc'"): the one whose
    value the message quotes, else all it reads; "" when none is set."""
    read = {k: v for k, v in sorted(os.environ.items())
            if k in ACCELERATE_READS or k.startswith("ACCELERATE_")}
    quoted = [k for k, v in read.items() if repr(v) in str(error)]
    if len(quoted) == 1:
        return (f" (accelerate reads {quoted[0]}={read[quoted[0]]!r} from the environment: "
                "correct or unset it)")
    listed = ", ".join(f"{k}={v!r}" for k, v in read.items())
    return (f" (accelerate reads {listed} from the environment: correct or unset the one it "
            "cannot read)") if read else ""


def restarts_refused(out: str) -> str | None:
    """Why a CPU run of several processes that torchrun may restart (--max-restarts, which it
    passes on as TORCHELASTIC_MAX_RESTARTS) is refused, before its rendezvous; None where it
    may not. Restarted after a failure, the processes waited in gloo's rendezvous (minutes,
    until stopped) or failed there with a traceback, a plain script's too (torch 2.15); and
    the restart of a new run would find its own run in --out."""
    restarts = positive_count(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if not restarts or launched_processes() < 2:
        return None
    return (f"torchrun --max-restarts {restarts} would start this run's processes again after a "
            "failure, and several CPU processes started again wait in gloo's rendezvous, or "
            "fail there, instead of training (the restart of a new run would also find its "
            "own run in --out); leave --max-restarts (accelerate launch: --max_restarts) out, "
            f"and continue a stopped run with --resume {out}.")


def rendezvous_address() -> str:
    """Where the run's processes meet, as their launcher (or a scheduler) set it."""
    return (f"MASTER_ADDR={os.environ.get('MASTER_ADDR')!r} "
            f"MASTER_PORT={os.environ.get('MASTER_PORT')!r}")


def store_failed(error: Exception) -> str:
    """The message for a process group that could not start its store at MASTER_ADDR and
    MASTER_PORT, which a process started without a launcher serves as rank 0 (torch's
    DistNetworkError traceback): most often the port is another program's."""
    where = rendezvous_address()
    if "EADDRINUSE" in str(error):
        return (f"process 0 cannot serve the run's rendezvous at {where}: the port is in use "
                "(by another run, or another program); set MASTER_PORT to a free port, the "
                "same on every process of this run.")
    return (f"the run's processes cannot meet at {where} ({one_line(error, 160)}); check both "
            "variables, the same on every process of this run.")


def share_cores() -> None:
    """torch's CPU threads in a launched process: its share of the physical cores it may use
    (torch's own default counts physical cores too), or OMP_NUM_THREADS where fewer and not 1.
    A launcher's OMP_NUM_THREADS is a guess: torchrun sets 1 for several processes,
    accelerate launch 1 unless --cpu, and with --cpu the host's physical cores over the
    processes, blind to a cpuset; a one-process CPU run took one core where plain python takes
    them all. A 1 set by hand reads the same as a launcher's. Plain python: torch's own."""
    if not launched():
        return
    asked = positive_count(os.environ.get("OMP_NUM_THREADS", ""))
    share = local_share(physical_cores(), launched_processes())
    torch.set_num_threads(share if asked in (None, 1) else min(asked, share))


def launcher_options_ignored() -> str | None:
    """A notice when `accelerate launch` was given a mixed precision or a dynamo backend (or
    `accelerate config` saved one): the run does not use them, its own options choose."""
    given = {option: os.environ.get(variable, "no") for option, variable in (
        ("--mixed_precision", "ACCELERATE_MIXED_PRECISION"),
        ("--dynamo_backend", "ACCELERATE_DYNAMO_BACKEND"))}
    given = {option: value for option, value in given.items() if value.lower() != "no"}
    if not given:
        return None
    return ("notice: accelerate launch's " + " and ".join(f"{o} {v}" for o, v in given.items())
            + f" {noun(len(given), 'is', 'are')} not used: this engine's --precision "
            "and --compile (--compile-mode) choose, as the line above says.")


def end_processes() -> None:
    """Leave the process group of torchrun or accelerate launch, once this process trains no
    more: gloo's threads otherwise die at exit with SIGABRT."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

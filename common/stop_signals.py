"""How a command stops on Ctrl-C, SIGTERM and SIGHUP: cleanly, with one line and the shell's
exit code, as Ctrl-C does; held off work that must not be cut in two, and at once where a wait
inside C++ would never let Python's handlers run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from common.hardware import launched
from common.streams import error_line

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
INTERRUPTED_LINE = "\ninterrupted"  # all a plain Ctrl-C prints, on a line of its own
# SIGTERM (timeout, Slurm, docker stop) and SIGHUP (the terminal or SSH session closed; torchrun
# hands its workers a SIGTERM for it) stop as cleanly as Ctrl-C, with the shell's 128 + signal
STOP_SIGNALS = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: 128 + signal.SIGTERM,
                signal.SIGHUP: 128 + signal.SIGHUP}
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent thread ends
_stop_requested = threading.Event()  # set by on_stop_signal, cleared by forget_stop
_stopped_by: list[int] = []  # the signal that stopped the command, for its exit code
_outcome_decided = threading.Event()  # set by decide_outcome, cleared by forget_stop
# the parent this process started under, read as this module loads: among a command's first
# imports, before its options are read and stop_with_launcher asks for the parent's death
PARENT = os.getppid()


def on_stop_signal(signum: int, frame) -> None:
    """run_main's handler of the stop signals: the signal noted (stopped_code,
    stop_if_interrupted), then the KeyboardInterrupt of Python's own Ctrl-C. A launched
    process's SIGTERM after a SIGTERM is the same stop, not a second one: Linux sends the
    parent-death signal (stop_with_launcher) again each time the process is handed to another
    of its dying launcher's threads (and after torchrun's own SIGTERM, where torchrun ends
    first); raised again, it cut short what the first one's stop was still doing (process 0 said
    'ckpt.pt holds the last epoch saved', not which epoch). Once the command's outcome is
    decided (decide_outcome), a stop changes nothing: raised as its error or its last output
    is being written, it would cut that short into a traceback."""
    if _outcome_decided.is_set() or (signum == signal.SIGTERM and _stopped_by == [signal.SIGTERM]
                                     and launched()):
        return
    _stopped_by[:] = [signum]
    _stop_requested.set()
    raise KeyboardInterrupt


def stop_requested() -> bool:
    """Whether a stop signal came since the command began (on_stop_signal)."""
    return _stop_requested.is_set()


def note_hang_up() -> None:
    """A terminal that hung up stopped the command, as its SIGHUP does, unless a signal had
    already."""
    _stopped_by[:] = _stopped_by or [signal.SIGHUP]


def decide_outcome() -> None:
    """As run_main's body ends, by returning or raising: what it ended with is the command's
    outcome. A launcher stops the processes left once one has failed (torchrun's SIGTERM),
    most likely as they say their own error, which the stop must not turn into a traceback."""
    _outcome_decided.set()


def forget_stop() -> None:
    """As run_main returns: a command run after it in this process starts unstopped."""
    _stop_requested.clear()
    _stopped_by.clear()
    _outcome_decided.clear()


def stop_with_launcher() -> None:
    """In a process torchrun or accelerate launch started: a SIGTERM when the launcher dies.
    Stopped, a launcher hands its processes a SIGTERM; killed outright (kill -9, the OOM
    killer) it hands them nothing, and torchrun's, each in a session of its own, trained on
    unseen, holding the run's folder and its GPU. Asked once, by
    interruptible_imports, before torch loads (seconds): the signal is then handled by
    whatever handler is in place when it comes (run_main's, a clean stop). A launcher that
    died before the request sends nothing: this process, handed to another parent by then,
    sends itself the SIGTERM. Only one killed before this module loaded goes unseen."""
    if launched():
        signal_at_parent_death(signal.SIGTERM)
        if os.getppid() != PARENT:
            os.kill(os.getpid(), signal.SIGTERM)


def signal_at_parent_death(signum: int) -> None:
    """Ask Linux to send this process signum when its parent ends (prctl PR_SET_PDEATHSIG);
    elsewhere nothing."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and was lost: raised inside a __del__ or a
    weakref callback (numba's, during garbage collection), Python prints and ignores it.
    Progress updates call this, so a command stops at the next step all the same."""
    if _stop_requested.is_set():
        raise KeyboardInterrupt


def quiet_lost_stop(previous: Callable) -> Callable:
    """A sys.unraisablehook that drops the 'Exception ignored' report of a lost Ctrl-C (it is
    not lost here: stop_if_interrupted raises it again) and hands the rest to `previous`."""
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
    return hook


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then act as they would have:
    for work an interrupt must not cut in two (a lock taken and never released, a fork hook
    that drops the interrupt). A handler that only takes note, not a blocked signal mask:
    Python runs handlers in the main thread whichever thread the signal reached (numba's,
    torch's)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread gets Python's signal handlers
        return
    caught: list[int] = []
    # one the command ignores stays ignored (SIGHUP under nohup, SIGINT in a background job):
    # noted, it was the one acted on, as nothing, and a SIGTERM after it was lost; and the
    # processes forked in the block (DataLoader workers) took it up again
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:  # the first one, as it would have been handled
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            else:
                signal.raise_signal(caught[0])


@contextmanager
def stop_signals_end_at_once() -> Iterator[None]:
    """For a block that waits inside C++, where Python's signal handlers never run: Ctrl-C,
    SIGTERM or SIGHUP then ends the process at once, run_main's line and code. For
    torch.distributed's rendezvous, which waits for a peer that may never come (a node that did
    not start), and writes nothing that could be left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    # Python's own C handler writes each signal's number here as it arrives, in any thread
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while received := os.read(read, 1):  # b"" once the block is done: the pipe closed
            if received[0] in STOP_SIGNALS:
                _stopped_by[:] = [received[0]]
                error_line(INTERRUPTED_LINE)
                os._exit(stopped_code())

    watcher = threading.Thread(target=watch, name="stop-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write)
        watcher.join()
        os.close(read)


def stopped_code() -> int:
    """The exit code of a command stopped by a signal: 130 for Ctrl-C, 143 for SIGTERM, 129
    for SIGHUP."""
    return STOP_SIGNALS.get(_stopped_by[0], INTERRUPTED) if _stopped_by else INTERRUPTED


def exit_at_once_on_ctrl_c() -> None:
    """At exit, Ctrl-C ends the process at once, silently: torch's own teardown takes seconds,
    even after a bare `import torch`, and a Ctrl-C in it printed an 'Exception ignored in
    atexit callback' traceback. Registered last, this runs first; the command's
    files are all written by then, and its output is flushed here."""
    def exit_now(signum: int, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            # OSError: a pipe whose reader left (| head); ValueError: closed; RuntimeError: this
            # handler runs inside that stream's own flush, which cannot be entered twice (a
            # buffered writer runs handlers between its writes: Python 3.10 ran one at exit so)
            with suppress(OSError, ValueError, RuntimeError):
                stream.flush()
        os._exit(INTERRUPTED)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job's stays so
        signal.signal(signal.SIGINT, exit_now)

"""The one way a command line ends: library errors become one message and an exit code."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import gc
import math
import os
import select
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType
from typing import NoReturn, TextIO, TypeVar

from common.allocator import allocator_problem
from common.errors import EngineError, Interrupted
from common.hardware import launched
from common.paths import dead_link

T = TypeVar("T")  # the value type of an argparse type below
INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
INTERRUPTED_LINE = "\ninterrupted"  # all a plain Ctrl-C prints, on a line of its own
# SIGTERM (timeout, Slurm, docker stop) and SIGHUP (the terminal or SSH session closed; torchrun
# hands its workers a SIGTERM for it) stop as cleanly as Ctrl-C, with the shell's 128 + signal
STOP_SIGNALS = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: 128 + signal.SIGTERM,
                signal.SIGHUP: 128 + signal.SIGHUP}
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent thread ends
PEER_SAYS_IT_S = 10  # how long a launched process waits for its machine's first to refuse
_stop_requested = threading.Event()  # set by run_main's handler, cleared when it returns
_stopped_by: list[int] = []  # the signal that stopped the command, for its exit code


def reopen_closed_streams() -> None:
    """Standard streams closed by the caller (`2>&-`) reopened on /dev/null: Python leaves
    them None, so the first error line raised an AttributeError nobody saw, and the next file
    opened took descriptor 2, where C libraries' warnings would then land."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        if getattr(sys, name) is not None:
            continue
        null = os.open(os.devnull, os.O_RDWR)
        with suppress(OSError):  # raises while fd is still free, for /dev/null to take
            os.fstat(fd)
            fd = null  # a file opened since took it: the stream gets a descriptor of its own
        if fd != null:
            os.dup2(null, fd)
            os.close(null)
        # the process's own stream, for as long as it runs: no block to close it in
        setattr(sys, name, open(fd, "r" if name == "stdin" else "w", closefd=False))  # noqa: SIM115


def error_line(text: str) -> None:
    """Print text on stderr in one write: stderr writes through, so print() sent the text and
    its newline as two, and the lines of processes sharing one stderr (torchrun's) could run
    into each other. Where no one reads stderr any more, nothing is said."""
    try:
        sys.stderr.write(f"{text}\n")
    except OSError:  # a pipe's reader gone, or a hung-up terminal's EIO: no one to tell
        quiet_if_gone(sys.stderr)


def quiet_if_gone(stream: TextIO) -> bool:
    """Point `stream` at /dev/null where its reader has gone (`| head`, or a `| tee` the same
    Ctrl-C ended): what is still written to it, and its flush at exit (else exit status 120),
    go nowhere instead of failing again. Whether it had gone."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # no descriptor (a test's capture), or closed
        return False
    watch = select.poll()  # a pipe whose reader has gone polls as an error, at once
    watch.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in watch.poll(0)):
        return False
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
    return True


def _hung_up_terminal(stream: TextIO) -> bool:
    """Whether stream is a terminal that hung up: its ioctls then fail with EIO (a file or a
    pipe's with ENOTTY), where a pipe whose reader left polls as an error too."""
    try:
        termios.tcgetattr(stream.fileno())
    except termios.error as error:
        return error.args[0] == errno.EIO
    except (OSError, ValueError):  # no descriptor (a test's capture), or closed
        return False
    return False


def hung_up(error: BaseException) -> bool:
    """Whether error is a write's EIO from the terminal of stdout or stderr hanging up (an
    SSH session dropped, a terminal window closed): Linux fails the terminal's writes first
    and only then signals SIGHUP (to the shell, which hands it on), so a write in between
    ends the command before that signal is there. Such streams then write to /dev/null
    (quiet_if_gone). A disk's EIO while a `| head` has gone is no hang-up: it is said."""
    return (isinstance(error, OSError) and error.errno == errno.EIO
            and any([quiet_if_gone(stream) for stream in (sys.stdout, sys.stderr)
                     if _hung_up_terminal(stream)]))


def _on_stop_signal(signum: int, frame) -> None:
    _stopped_by[:] = [signum]
    _stop_requested.set()
    raise KeyboardInterrupt


def stop_with_launcher() -> None:
    """In a process torchrun or accelerate launch started: a SIGTERM when the launcher dies.
    Stopped, a launcher hands its processes a SIGTERM; killed outright (kill -9, the OOM
    killer) it hands them nothing, and torchrun's, each in a session of its own, trained on
    unseen, holding the run's folder and its GPU. Asked once, by
    interruptible_imports, before torch loads (seconds): the signal is then handled by
    whatever handler is in place when it comes (run_main's, a clean stop). Only a launcher
    killed in the moment before a command's own options were read goes unseen."""
    if launched():
        signal_at_parent_death(signal.SIGTERM)


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


def _quiet_lost_stop(previous: Callable) -> Callable:
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


def os_error_text(error: OSError) -> str:
    """An OSError as one line that names its file (when it has one) and what to do."""
    if error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"the disk is full{where}; free some space or write to another disk."
    if error.filename and (problem := dead_link(error.filename)):
        return f"{error.filename} {problem}."
    where = f" {error.filename}" if error.filename else ""
    if error.errno == errno.EISDIR:  # a run's .lock, a .beton's sidecar: not to be checked
        return (f"cannot use{where}: it is a folder where a file belongs; move it away, or "
                "choose another path.")
    if error.errno in (errno.EACCES, errno.EPERM):  # neither a missing path nor a full disk
        return (f"cannot use{where}: {error.strerror}; fix its permissions, or those of the "
                "folders above it, or choose another path.")
    return (f"cannot use{where}: {error.strerror or error}. Check that the path exists, is "
            "writable and that its disk has free space.")


def path_option(what: str) -> Callable[[str], Path]:
    """An argparse type for a path option: an empty value (a shell variable left unset) is
    refused, where Path('') would silently mean the current directory. `what` ends the
    message: what such a value would do there."""
    def parse(value: str) -> Path:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"an empty value would {what}; name a path")
        return Path(value)
    return parse


def positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type: a number of `kind` that is at least 1 (or above 0 for floats), and
    finite (--matmul-seconds inf would time blocks forever)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        if value == math.inf:
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: '1e3'"
    return parse


def option_name(dest: str) -> str:
    """The command-line option an argparse dest comes from, for messages: batch_size ->
    --batch-size."""
    return f"--{dest.replace('_', '-')}"


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, 'prog: error: ...; see --help', not
    the whole usage first (engine/train.py's alone is two dozen lines above the one that
    matters). Exit code 2, as argparse's. Under a launcher, every process reads the same
    options: the first of each machine's (LOCAL_RANK 0) says what is wrong, not every one."""

    def error(self, message: str) -> NoReturn:
        if launched() and os.environ.get("LOCAL_RANK", "0") != "0":
            # torchrun ends every process once one has failed (SIGTERM, within its 0.1 s
            # monitor interval): one that exited first ended the first before it had said it.
            # Not ended by then, the first did not refuse them: this one says it after all
            with suppress(KeyboardInterrupt):  # a Ctrl-C meanwhile: exit as refused
                time.sleep(PEER_SAYS_IT_S)
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _refuse_an_aborting_allocator() -> None:
    """End the command in one line, 1, where torch would abort as it loads (common.allocator)."""
    if problem := allocator_problem():
        error_line(f"error: {problem}")
        sys.exit(1)


@contextmanager
def interruptible_imports() -> Iterator[None]:
    """Around a script's slow imports (torch: seconds, before run_main is in place): a Ctrl-C
    meanwhile ends the command as run_main's would, one line and 130, even where a library
    swallows it: one that lands while torch imports numpy is lost, and the command ran on, or
    failed later on the half-imported numpy (a RecursionError). First, an allocator setting
    torch would abort on as it loads is refused in one line (common.allocator), and a process
    a launcher started asks for a SIGTERM at the launcher's death (stop_with_launcher)."""
    reopen_closed_streams()
    stop_with_launcher()  # its SIGTERM, until run_main's handlers, ends it as torch loads
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or previous in (signal.SIG_IGN, None)):  # None: set outside Python, not restorable
        _refuse_an_aborting_allocator()
        yield  # SIG_IGN: a background job, which a Ctrl-C must not stop
        return
    # its own record, not run_main's: a block inside another (a module imported in one that
    # imports in one itself) exits through the outer one, which must let that exit pass
    # rather than report it again
    caught: list[int] = []

    def note(signum: int, frame) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        _refuse_an_aborting_allocator()
        yield
    except BaseException:
        if not caught:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        error_line(INTERRUPTED_LINE)
        sys.exit(INTERRUPTED)


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


def error_text(error: Exception) -> str:
    """The one line a command prints for a failure it expects: an EngineError's own words, a
    file it could not read or write, memory; any other error is a bug, raised again."""
    if isinstance(error, EngineError):
        return str(error)
    if isinstance(error, OSError):  # a file the library could not read or write: name it
        return os_error_text(error)
    if isinstance(error, MemoryError):  # numpy's _ArrayMemoryError too
        return ("out of memory; use a smaller dataset, --batch-size or --width, or a machine "
                "with more memory.")
    raise error


def _bound_with_nanobind(module: object) -> bool:
    """Whether module is an extension built with nanobind: its functions and classes are
    nanobind's own types."""
    if not isinstance(module, ModuleType):  # sys.modules may hold other objects (or None)
        return False
    names = vars(module)  # not getattr: a lazy module's hook could import, or raise, at exit
    return str(names.get("__file__") or "").endswith(tuple(EXTENSION_SUFFIXES)) and any(
        type(value).__module__ == "nanobind" for value in names.values())


def spare_last_collection() -> None:
    """At exit: gc.freeze spares the interpreter its last full collection, which walks torch's
    whole object graph to free memory the process hands back anyway (most of the time a command
    took after its last line). Not once an extension built with nanobind is loaded (triton's
    from 3.9, which torch.compile imports): the objects freezing keeps alive look leaked to
    nanobind's check at exit, which then prints thirty-odd lines of leak reports after the
    command's own."""
    if not any(_bound_with_nanobind(module) for module in list(sys.modules.values())):
        gc.freeze()


def run_main(body: Callable[[], int | None]) -> int:
    """Call a command's body; EngineError -> 'error: ...' and 1, Ctrl-C -> one line and 130
    (SIGTERM: 143, SIGHUP: 129).

    At exit, spare_last_collection; atexit callbacks and module teardown still run.
    """
    previous, hook = {}, sys.unraisablehook
    # all in the try: a Ctrl-C before the handlers below are in place (Python's own raises
    # KeyboardInterrupt), or the moment one is, is a stop like any other, not a traceback
    try:
        reopen_closed_streams()
        if hasattr(sys.stdout, "reconfigure"):  # a file name's bytes that are not UTF-8 printed
            sys.stdout.reconfigure(errors="surrogateescape")  # as they are, as ls does
        if threading.current_thread() is threading.main_thread():
            sys.unraisablehook = _quiet_lost_stop(hook)
            # once, however often it runs
            for callback in (spare_last_collection, exit_at_once_on_ctrl_c):
                atexit.unregister(callback)
                atexit.register(callback)
            # a signal ignored as the command started stays so: SIGINT in a script's background
            # job, which the terminal's Ctrl-C is not meant for (interruptible_imports too)
            for s in STOP_SIGNALS:
                # noted before it is replaced: a signal as signal.signal returns raises
                # before an assignment of what it returned, and the handler stayed
                if (handler := signal.getsignal(s)) is not signal.SIG_IGN:
                    previous[s] = handler
                    signal.signal(s, _on_stop_signal)
        code = body() or 0
        stop_if_interrupted()  # a signal lost in a finalizer or an at-fork hook still stops
        return code
    except Interrupted as stop:
        error_line(f"\ninterrupted: {stop}")
        return stopped_code()
    except KeyboardInterrupt:
        error_line(INTERRUPTED_LINE)
        return stopped_code()
    except BrokenPipeError as error:
        if not (quiet_if_gone(sys.stdout) | quiet_if_gone(sys.stderr)):  # a socket's, say
            error_line(f"error: {error_text(error)}")
            return 1
        if _stop_requested.is_set():  # the Ctrl-C that ended a `| tee` too: it stopped this
            return stopped_code()
        error_line("error: stopped: the program reading this command's output (such as head "
                   "or tee) closed it; send the output to a file or keep its reader running.")
        return 1
    except Exception as error:
        try:
            if hung_up(error):  # a closed terminal: stopped as its SIGHUP stops the command
                _stopped_by[:] = _stopped_by or [signal.SIGHUP]
                if signal.SIGHUP in previous:  # that SIGHUP, still to come, is not a
                    del previous[signal.SIGHUP]  # second stop, nor a death at exit
                    signal.signal(signal.SIGHUP, signal.SIG_IGN)
                return stopped_code()
        except KeyboardInterrupt:  # its SIGHUP came as this looked, the moment it is most
            hung_up(error)  # likely to: the same stop, its streams quieted all the same
            return stopped_code()
        if _stop_requested.is_set():  # a library made the Ctrl-C an error of its own: torch's
            error_line(INTERRUPTED_LINE)  # exporter, stopped mid-import, raises TorchExportError
            return stopped_code()
        error_line(f"error: {error_text(error)}")
        return 1
    finally:
        _stop_requested.clear()
        _stopped_by.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook

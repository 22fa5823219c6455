"""A command line's start and end: the parser whose usage errors are one line, its option types,
imports a Ctrl-C may stop, and run_main, the one way a command ends (a library's error becomes
one message and an exit code)."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NoReturn, TypeVar

from common.allocator import allocator_problem
from common.errors import EngineError, Interrupted
from common.hardware import first_of_machine, launched
from common.paths import DISK_FULL, FILE_SIZE_FIX, dead_link
from common.stop_signals import (
    INTERRUPTED,
    INTERRUPTED_LINE,
    STOP_SIGNALS,
    decide_outcome,
    exit_at_once_on_ctrl_c,
    forget_stop,
    note_hang_up,
    on_stop_signal,
    quiet_lost_stop,
    stop_if_interrupted,
    stop_requested,
    stop_with_launcher,
    stopped_code,
)
from common.streams import (
    error_line,
    hung_up,
    printable_stdout,
    quiet_if_gone,
    reopen_closed_streams,
    write_stdout,
)
from common.torch_environment import (
    address_space_problem,
    cache_folder_problem,
    deleted_cwd_problem,
    torch_setting_problem,
)

T = TypeVar("T")  # the value type of an argparse type below
PEER_SAYS_IT_S = 10  # how long a launched process waits for its machine's first to refuse


def os_error_text(error: OSError) -> str:
    """An OSError as one line that names its file (when it has one) and what to do."""
    if error.errno in DISK_FULL:
        where = f" writing {error.filename}" if error.filename else ""
        return f"the disk is full{where}; free some space or write to another disk."
    if error.errno == errno.EFBIG:  # no free space would help: the limit is this process's
        where = f" {error.filename}" if error.filename else ""
        return (f"cannot write{where}: it passes this process's file size limit; "
                f"{FILE_SIZE_FIX}.")
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


def summary(doc: str | None) -> str | None:
    """The first line of a command's docstring, its --help description; None under python -OO,
    which strips docstrings (`__doc__.splitlines()` then ended the command in a traceback)."""
    return doc.splitlines()[0] if doc else None


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
    options: the first of each machine's (LOCAL_RANK 0) says what is wrong, not every one.
    Options are taken whole, never as prefixes (argparse's allow_abbrev), in every command
    alike: `--epoch` for `--epochs` would break, or change meaning, once an option is added,
    and lr_find's and compare's own options are parsed apart from train's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        if launched() and not first_of_machine():
            # torchrun ends every process once one has failed (SIGTERM, within its 0.1 s
            # monitor interval): one that exited first ended the first before it had said it.
            # Not ended by then, the first did not refuse them: this one says it after all
            with suppress(KeyboardInterrupt):  # a Ctrl-C meanwhile: exit as refused
                time.sleep(PEER_SAYS_IT_S)
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")

    def print_help(self, file: IO[str] | None = None) -> None:
        """argparse's, but help that cannot be written (stdout on a full disk) ends in one line
        and exit status 1: argparse drops the write's error, and exited 0 with no help written,
        or 120 with 'Exception ignored' lines where the interpreter flushed stdout at exit."""
        if file is not None:
            return super().print_help(file)
        try:
            write_stdout(self.format_help())
        except BrokenPipeError:  # its reader took what it wanted (`--help | head`)
            quiet_if_gone(sys.stdout)
        except OSError as error:
            self.exit(1, f"{self.prog}: error: {os_error_text(error)}\n")
        return None


@contextmanager
def _torch_loading() -> Iterator[None]:
    """Around torch's import, ending the command in one line and 1 that names the setting: first
    what torch would abort or fail on as it loads (common.allocator: an allocator setting;
    common.torch_environment: a deleted current folder, a cache folder it cannot make), then
    its import failing on a setting it refuses (TORCH_LOGS, PYTORCH_JIT) or under ulimit -v
    (common.torch_environment)."""
    if problem := deleted_cwd_problem() or allocator_problem() or cache_folder_problem():
        error_line(f"error: {problem}")
        sys.exit(1)
    try:
        yield
    except (ValueError, ImportError) as error:
        if problem := address_space_problem(error, "torch"):
            error_line(f"error: {problem}")
        elif said := torch_setting_problem(error):
            error_line(said)
        else:
            raise
        sys.exit(1)


@contextmanager
def interruptible_imports() -> Iterator[None]:
    """Around a script's slow imports (torch: seconds, before run_main is in place): a Ctrl-C
    meanwhile ends the command as run_main's would, one line and 130, even where a library
    swallows it: one that lands while torch imports numpy is lost, and the command ran on, or
    failed later on the half-imported numpy (a RecursionError). What torch cannot load under
    is said in one line (_torch_loading), and a process a launcher started asks for a SIGTERM
    at the launcher's death (stop_with_launcher)."""
    reopen_closed_streams()
    stop_with_launcher()  # its SIGTERM, until run_main's handlers, ends it as torch loads
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or previous in (signal.SIG_IGN, None)):  # None: set outside Python, not restorable
        with _torch_loading():
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
        with _torch_loading():
            yield
    except BaseException:
        if not caught:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        error_line(INTERRUPTED_LINE)
        sys.exit(INTERRUPTED)


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
        printable_stdout()  # a file name's bytes that are not UTF-8 as they are, as ls does
        if threading.current_thread() is threading.main_thread():
            sys.unraisablehook = quiet_lost_stop(hook)
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
                    signal.signal(s, on_stop_signal)
        try:
            code = body() or 0
        finally:
            decide_outcome()
        write_stdout()  # what stdout still buffers: a full disk said here, not at exit (120)
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
        if stop_requested():  # the Ctrl-C that ended a `| tee` too: it stopped this
            return stopped_code()
        # what a run kept and how to go on: engine.loop.train's note
        kept = "".join(f" {note}" for note in getattr(error, "__notes__", ()))
        error_line("error: stopped: the program reading this command's output (such as head "
                   "or tee) closed it; send the output to a file or keep its reader running."
                   + kept)
        return 1
    except Exception as error:
        if hung_up(error):  # a closed terminal: stopped as its SIGHUP stops the command
            note_hang_up()
            if signal.SIGHUP in previous:  # that SIGHUP, still to come, is not a
                del previous[signal.SIGHUP]  # second stop, nor a death at exit
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            return stopped_code()
        if stop_requested():  # a library made the Ctrl-C an error of its own: torch's
            error_line(INTERRUPTED_LINE)  # exporter, stopped mid-import, raises TorchExportError
            return stopped_code()
        error_line(f"error: {error_text(error)}")
        return 1
    finally:
        try:  # what an error above left in stdout's buffer: not failed on again at exit
            write_stdout()
        except OSError:
            quiet_if_gone(sys.stdout)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        forget_stop()  # last: a stop before the handlers above are back changes nothing

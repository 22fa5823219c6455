"""The one way a command line ends: library errors become one message and an exit code."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from common.errors import EngineError, Interrupted

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
_ctrl_c = threading.Event()  # set by run_main's SIGINT handler, cleared when it returns


def _on_sigint(signum: int, frame) -> None:
    _ctrl_c.set()
    raise KeyboardInterrupt


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and was lost: raised inside a __del__ or a
    weakref callback (numba's, during garbage collection), Python prints and ignores it.
    Progress updates call this, so a command stops at the next step all the same."""
    if _ctrl_c.is_set():
        raise KeyboardInterrupt


def _quiet_lost_ctrl_c(unraisable, previous=sys.unraisablehook) -> None:
    """sys.unraisablehook that drops the 'Exception ignored' report of a lost Ctrl-C: it is
    not lost here, stop_if_interrupted raises it again."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        previous(unraisable)


def run_main(body: Callable[[], int | None]) -> int:
    """Call a command's body; EngineError -> 'error: ...' and 1, Ctrl-C -> one line and 130."""
    previous, hook = None, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _quiet_lost_ctrl_c
    try:
        return body() or 0
    except Interrupted as stop:
        print(f"\ninterrupted: {stop}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the library could not read or write: name it
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot use{where}: {error.strerror or error}. Check that the path "
              "exists, is writable and that its disk has free space.", file=sys.stderr)
        return 1
    finally:
        _ctrl_c.clear()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = hook

"""The one way a command line ends: library errors become one message and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import EngineError, Interrupted

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


def run_main(body: Callable[[], int | None]) -> int:
    """Call a command's body; EngineError -> 'error: ...' and 1, Ctrl-C -> one line and 130."""
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

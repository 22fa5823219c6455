"""A command's standard streams: reopened where the caller closed them, written a line at a
time, and sent to /dev/null where their reader has gone or their terminal hung up."""

from __future__ import annotations

import codecs
import errno
import os
import select
import sys
import termios
from collections.abc import Callable
from contextlib import suppress
from typing import TextIO


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


# a file name's bytes that are not UTF-8 (lone surrogates) printed as they are, as ls does; any
# other character stdout's encoding cannot write (PYTHONIOENCODING=ascii, LC_ALL=C on Python
# without UTF-8 mode) as a backslash escape
PRINT_ERRORS = "cifar10-engine-printable"


def _printable(error: UnicodeError) -> tuple[str | bytes, int]:
    """codecs' error handler PRINT_ERRORS: surrogateescape where it applies, else
    backslashreplace (surrogateescape alone raised a UnicodeEncodeError and a traceback for
    'é' in an --out printed on an ASCII stdout)."""
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


def printable_stdout() -> None:
    """stdout written whatever its encoding cannot encode: with PRINT_ERRORS (registered here,
    not as this module is imported, which only defines things; registering again replaces)."""
    codecs.register_error(PRINT_ERRORS, _printable)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors=PRINT_ERRORS)


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
    _to_null(fd)
    return True


def _to_null(fd: int) -> None:
    """Descriptor fd pointed at /dev/null: what its stream still writes, or holds in its buffer
    for the interpreter's flush at exit, goes nowhere instead of failing again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def write_stdout(text: str = "") -> None:
    """Write text to stdout and flush it, so that a failure is raised here, where it can still
    be said: else the interpreter's flush at exit met it (a full disk: exit status 120 and its
    'Exception ignored' lines). The OSError names standard output, which then writes to
    /dev/null; a reader gone or a terminal hung up is raised as it is, for run_main to tell."""
    if sys.stdout.closed:  # closed by the command itself: nothing is left to write
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as error:
        if isinstance(error, BrokenPipeError) or error.errno == errno.EIO:
            raise
        with suppress(OSError, ValueError):  # no descriptor (a test's capture)
            _to_null(sys.stdout.fileno())
        raise OSError(error.errno, error.strerror, "standard output") from None


# where library code sends its progress lines: the command line passes say, a caller that
# wants the results alone passes silent
Log = Callable[[str], None]


def silent(line: str) -> None:
    """A Log that says nothing."""


def say(line: str) -> None:
    """print() for a command's lines on stdout, through write_stdout: each flushed as it is
    said (a log is complete at every moment), and a full disk named as standard output even
    mid-run, where print's OSError named no file."""
    write_stdout(line + "\n")


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

"""One error hierarchy: library code raises these, command lines turn them into one message.

Every message says what went wrong, names the file or option, and says what to do about it.
"""

from __future__ import annotations

import unicodedata


class EngineError(Exception):
    """Base of every error a user can act on; the message is the whole explanation."""


class DataError(EngineError):
    """Missing, corrupt or malformed data; the message names the file and the fix."""


class LoaderError(EngineError):
    """A loader failed while making batches (FFCV's pipeline thread died, ...)."""


class CheckpointError(EngineError):
    """A file that is not a readable cifar10-engine checkpoint; the message says why."""


class TrainingError(EngineError):
    """Training cannot start or go on (diverged, out of memory, bad options)."""


class RunFailed(TrainingError):
    """A run that was training stopped on its own numbers (they diverged, or a batch did not
    fit in memory): a finding about its options. Any other TrainingError is a setup to fix
    before anything trains (an option this machine cannot run, fewer --epochs than done)."""


class RangeTestError(EngineError):
    """The LR range test found no usable curve; the message says what to change."""


class OutputError(EngineError):
    """An output folder cannot be created, written or taken (in use by another run)."""


class ReportError(EngineError):
    """A report cannot be made from these inputs; the message says what to change."""


class Interrupted(EngineError):
    """Ctrl-C: the message says what was kept and how to go on."""


class SetupError(EngineError):
    """The environment lacks what a command needs: a package, a wheel, a GPU."""


class ExportError(EngineError):
    """A model cannot be exported, or its export does not compute what the checkpoint does."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line, 'ValueError: ...', for a message or a table row: library
    messages can be empty, many lines or pages long."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def shown(text: str) -> str:
    """text that can be printed, drawn and written as UTF-8: the bytes of a file name that are
    not UTF-8 (which Python keeps as lone surrogates) become '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


CONTROL = ("Cc", "Zl", "Zp")  # the Unicode categories of line breaks, tabs, NUL and the like


def plain_line(text: str) -> bool:
    """Whether text prints as one visible line of a message or a table: not blank, and no
    line break (any that str.splitlines splits at), tab, NUL or other control character."""
    return bool(text.strip()) and not any(unicodedata.category(c) in CONTROL for c in text)


def escaped(text: str) -> str:
    """text on one line of a table: each line break, tab or other control character written
    as repr writes it ('\\n', '\\t', '\\x00'), the rest as it is (a file name may hold any)."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in CONTROL else c for c in text)


def unplain(names: list[str]) -> str | None:
    """What is wrong with those of `names` that are no plain_line, naming them; None when all
    are: each class name is a line of the report's tables and of messages."""
    broken = [repr(name) for name in names if not plain_line(name)]
    return (f"blank or hold a line break, tab or other control character ({', '.join(broken)})"
            if broken else None)


def listing(names: list[str], most: int = 3, sep: str = ", ") -> str:
    """`names` for a message: the first `most`, then how many more (`sep` "; " where names
    hold commas themselves)."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return sep.join(names[:most]) + more

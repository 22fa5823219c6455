"""Progress: a tqdm bar on a terminal; in a log (a batch job, `| tee`) a line every so often,
since tqdm would write each of its refreshes into the file."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from common.stop_signals import stop_if_interrupted
from common.streams import error_line

LOG_INTERVAL = 30.0  # seconds between progress lines when standard error is not a terminal
POSTFIX_INTERVAL = 1.0  # seconds between a bar's postfix refreshes: nobody reads faster


class LineProgress:
    """The part of tqdm's interface the engine uses, writing a line at most every `interval`."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = LOG_INTERVAL):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix = 0, ""
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        stop_if_interrupted()
        self.n += n
        if self.due():
            self.last = time.monotonic()
            units = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
            error_line(f"{self.desc}: {self.n}/{self.total} {units} {self.postfix}".rstrip())

    def due(self) -> bool:
        """Whether the next update writes a line: the time to refresh a costly postfix."""
        return time.monotonic() - self.last >= self.interval

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Bar(tqdm):
    """tqdm whose every update is a point where a lost Ctrl-C is raised again."""

    postfix_at = -math.inf  # when due() last said yes

    def update(self, n: int = 1) -> bool | None:
        stop_if_interrupted()
        return super().update(n)

    def due(self) -> bool:
        """Whether to refresh a costly postfix now: once a second, never when disabled."""
        if self.disable or time.monotonic() - self.postfix_at < POSTFIX_INTERVAL:
            return False
        self.postfix_at = time.monotonic()
        return True


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Bar | LineProgress:
    """A tqdm bar on a terminal, LineProgress in a log, or a silent bar when not enabled
    (processes other than the main one)."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, unit)
    return Bar(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
               disable=not enabled)


def track(items: Iterable, total: int | None = None, desc: str = "", unit: str = "it",
          ) -> Iterator:
    """Iterate items with a progress bar (or progress lines in a log); `total` when items
    has no len()."""
    with progress_bar(len(items) if total is None else total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()

"""Progress display: when a costly postfix (it waits for the device) is worth computing."""

from __future__ import annotations

import os
import pty
import sys
from collections.abc import Iterator

import pytest
from conftest import ROOT, SignalsWhenCollected

from common.cli import run_main
from common.progress import Bar, LineProgress, progress_bar, track


def test_a_log_line_is_due_once_its_interval_has_passed(capsys):
    """The line counts every unit an update brings and shows each postfix value (the loop
    sets several) in the order given, space-separated (ours: tqdm's bar sorts them and puts
    commas between)."""
    line = LineProgress(10, "epoch 1/1", "batch", interval=0.0)
    assert line.due()
    line.set_postfix(loss="0.5", acc="80.0%")
    line.update(3)
    assert capsys.readouterr().err == "epoch 1/1: 3/10 batches loss=0.5 acc=80.0%\n"
    assert not LineProgress(10, "epoch 1/1", "batch", interval=3600.0).due()


def test_a_bar_refreshes_its_postfix_at_most_once_a_second_and_never_when_disabled():
    bar = Bar(total=10, disable=False)
    assert bar.due() and not bar.due()  # the second ask comes within the second
    bar.close()
    assert not Bar(total=10, disable=True).due()


def test_a_log_gets_one_line_per_interval_not_one_per_update_after_it(capsys):
    """LineProgress exists so a log is not flooded: once a line is written the next waits a
    whole interval again, and due() says yes exactly when update() writes."""
    line = LineProgress(10, "epoch 1/1", "batch", interval=3600.0)
    line.last -= 3600.0  # as if an hour had passed since the last line
    assert line.due()
    line.update()
    assert not line.due()
    line.update()
    line.update()
    assert capsys.readouterr().err == "epoch 1/1: 1/10 batches\n"


def test_a_log_gets_a_line_every_30_seconds_as_the_docs_say():
    """docs/training.md and docs/layout.md promise a log a line every 30 s: the LineProgress a
    log gets waits that long (not the tests' interval 0 or an hour)."""
    for page in ("training.md", "layout.md"):
        assert "a line every 30 s" in " ".join((ROOT / "docs" / page).read_text().split())
    line = progress_bar(10, "epoch 1/1", "batch")
    assert isinstance(line, LineProgress) and line.interval == 30.0


def test_processes_other_than_the_main_one_get_a_silent_bar_even_in_a_log(capsys):
    """Under torchrun every process shares one log: only the main one writes progress lines
    (stderr, captured, is no terminal, as in a batch job)."""
    assert isinstance(progress_bar(10, "epoch 1/1", "batch"), LineProgress)
    quiet = progress_bar(10, "epoch 1/1", "batch", enabled=False)
    assert isinstance(quiet, Bar) and quiet.disable


def test_a_terminal_gets_a_tqdm_bar_not_log_lines(monkeypatch):
    """On a terminal (here a real pty as standard error) the main process gets tqdm's bar, which
    redraws its one line in place, and no line every interval."""
    terminal, user_side = pty.openpty()
    with os.fdopen(terminal, "rb", buffering=0), os.fdopen(user_side, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        bar = progress_bar(10, "epoch 1/1", "batch")
        assert isinstance(bar, Bar) and not bar.disable
        bar.close()


def _silent_steps(n: int) -> Iterator[int]:
    """n steps under the silent bar of a process other than the main one, updated per step."""
    with progress_bar(n, "epoch 1/1", "batch", enabled=False) as bar:
        for step in range(n):
            yield step
            bar.update()


@pytest.mark.parametrize("steps", [
    lambda: track(range(100), desc="epoch 1/1", unit="batch"),
    lambda: _silent_steps(100),
], ids=["log lines", "silent bar"])
def test_a_stop_signal_lost_in_a_finalizer_stops_the_loop_at_its_next_progress_update(
        capsys, steps):
    """A SIGTERM raised inside a __del__ is dropped by Python: the next progress update raises
    it again, so training stops at the next step, not once every epoch has run; in the main
    process's log and in every other process, whose silent bar is the Bar a terminal gets."""
    seen = []

    def body() -> None:
        for step in steps():
            seen.append(step)
            if step == 2:
                SignalsWhenCollected()

    assert run_main(body) == 143
    assert seen == [0, 1, 2]

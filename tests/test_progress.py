"""Progress display: when a costly postfix (it waits for the device) is worth computing."""

from __future__ import annotations

from common.progress import Bar, LineProgress


def test_a_log_line_is_due_once_its_interval_has_passed(capsys):
    line = LineProgress(10, "epoch 1/1", "batch", interval=0.0)
    assert line.due()
    line.set_postfix(loss="0.5")
    line.update()
    assert capsys.readouterr().err == "epoch 1/1: 1/10 batches loss=0.5\n"
    assert not LineProgress(10, "epoch 1/1", "batch", interval=3600.0).due()


def test_a_bar_refreshes_its_postfix_at_most_once_a_second_and_never_when_disabled():
    bar = Bar(total=10, disable=False)
    assert bar.due() and not bar.due()  # the second ask comes within the second
    bar.close()
    assert not Bar(total=10, disable=True).due()

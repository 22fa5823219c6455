"""engine.history: the rules every reader of a run's epochs shares."""

from engine.history import best_epoch, steady_seconds


def test_the_best_epoch_is_the_first_of_a_tie():
    """best.pt keeps an epoch until a later one is more accurate, not as accurate."""
    history = [dict(epoch=1, test_acc=0.5), dict(epoch=2, test_acc=0.7),
               dict(epoch=3, test_acc=0.7), dict(epoch=4, test_acc=0.6)]
    assert best_epoch(history)["epoch"] == 2


def test_steady_seconds_leave_the_warm_up_out():
    """The median of the epochs after the first: a compiling first epoch and one slow epoch
    after it move it not; of an even count, the mean of the middle two (not either one: a
    3-epoch run's figure is both its later epochs'); a one-epoch run has only its first, no
    epoch has none."""
    history = [dict(seconds=s) for s in (30.0, 1.0, 1.2, 9.0)]
    assert steady_seconds(history) == 1.2
    assert steady_seconds(history[:3]) == 1.1
    assert steady_seconds(history[:1]) == 30.0 and steady_seconds([]) is None

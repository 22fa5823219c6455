"""The --log-with trackers (accelerate's: tensorboard, wandb, ...): checked before any work,
opened with the run's config, writing under the run folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from common.errors import TrainingError, shown

if TYPE_CHECKING:
    from engine.run import Run

TRACKER_PROJECT = "cifar10-engine"  # the --log-with trackers' project, and their folder in the run


def tracker_names() -> list[str]:
    """What accelerate's log_with takes: --log-with's choices, and what a saved config's
    log_with is checked against."""
    return [t.value for t in LoggerType]


def check_tracker(log_with: str | None, out: str = "") -> None:
    """TrainingError, before any work, when --log-with names a tracker whose package is not
    installed (accelerate would drop it, saying so only in a debug log line, and train without
    it), or when the run folder `out`, where the trackers write, is named in bytes that are not
    UTF-8: tensorboard takes its folder as UTF-8 text (a UnicodeEncodeError traceback)."""
    if log_with is not None and shown(out) != out:
        raise TrainingError(f"--log-with {log_with}: the trackers name their files in UTF-8, "
                            f"and --out {shown(out)} holds bytes that are not UTF-8 (shown as "
                            "?); choose an --out named in UTF-8, or leave --log-with out.")
    installed = [tracker.value for tracker in get_available_trackers()]
    if log_with is None or (installed if log_with == "all" else log_with in installed):
        return
    if log_with == "all":  # accelerate's every tracker that is installed: none is
        raise TrainingError("--log-with all: no tracker's package is installed; pip install "
                            "one (e.g. tensorboard), or leave --log-with out.")
    raise TrainingError(f"--log-with {log_with}: its package is not installed; pip install "
                        f"{log_with}, or leave --log-with out.")


def start_trackers(run: Run) -> None:
    """Open the --log-with trackers (check_tracker has made sure they are installed)."""
    # as text trackers take (shown: a --data-dir named in bytes that are not UTF-8 was a
    # UnicodeEncodeError traceback in tensorboard's hparams)
    flat = {k: v if isinstance(v, int | float | bool) else shown(str(v))
            for k, v in run.cfg.to_dict().items()}
    run.accelerator.init_trackers(TRACKER_PROJECT, config=flat)

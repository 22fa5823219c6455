"""A run's history, the rows of metrics.jsonl (an epoch each): read back from a run folder, and
the figures every command and tool takes from it. Torch-free: the GPU suite's summary reads the
rows where torch may be missing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common.atomic import ENCODING


def read_history(folder: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl in `folder`, as engine.checkpoint writes them each
    epoch; OSError where it cannot be read, ValueError where a line is no JSON (cut short)."""
    text = (folder / "metrics.jsonl").read_text(encoding=ENCODING)
    return [json.loads(line) for line in text.splitlines()]


def best_epoch(history: list[dict]) -> dict:
    """The epoch of highest test accuracy, the first of a tie: the one best.pt keeps."""
    return max(history, key=lambda row: row["test_acc"])


def time_spent(history: list[dict], column: str = "seconds") -> float:
    """The seconds the epochs of `history` spent training ("seconds"), or evaluating
    ("eval_seconds": a column that rows from before it lack, so asked for by name)."""
    return sum(row[column] for row in history)


def steady_seconds(history: list[dict]) -> float | None:
    """Training seconds per epoch: the median of the epochs after the first (the warm-up: on
    a GPU, compilation, CUDA graphs' recording and cuDNN's autotuning), a one-epoch run's
    only epoch, or None for no epoch."""
    seconds = [row["seconds"] for row in history[1:] or history]
    return statistics.median(seconds) if seconds else None

"""A run's history, the rows of metrics.jsonl (an epoch each), read as every tool reads it.
Torch-free: the GPU suite's summary reads the rows where torch may be missing."""

from __future__ import annotations

import statistics


def best_epoch(history: list[dict]) -> dict:
    """The epoch of highest test accuracy, the first of a tie: the one best.pt keeps."""
    return max(history, key=lambda row: row["test_acc"])


def steady_seconds(history: list[dict]) -> float | None:
    """Training seconds per epoch: the median of the epochs after the first (the warm-up: on
    a GPU, compilation, CUDA graphs' recording and cuDNN's autotuning), a one-epoch run's
    only epoch, or None for no epoch."""
    seconds = [row["seconds"] for row in history[1:] or history]
    return statistics.median(seconds) if seconds else None

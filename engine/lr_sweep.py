"""The LR range test's sweep: its defaults, its limits and the check of one asked for, in plain
Python, so that tools/lr_find.py parses its options before torch loads; engine.lr_range runs it."""

from __future__ import annotations

import math

from engine.config import FLOAT32_MAX

START_LR, END_LR, ITERATIONS = 1e-7, 10.0, 100  # fastai's lr_find defaults
SKIP = 10  # early points left out of the steepest-slope search (fastai v1's skip_start)
MIN_ITERATIONS = 2 * SKIP  # ours: as many steps searched as skipped, at the least
MAX_ITERATIONS = 100_000  # ours: 1000x fastai's default; past it a typo, never a sweep


def check_sweep(start_lr: float, end_lr: float, iterations: int) -> None:
    """Raise ValueError, with the fix, for a sweep that cannot run."""
    if not 0 < start_lr < end_lr <= FLOAT32_MAX:
        raise ValueError(f"the sweep needs 0 < --start-lr < --end-lr <= {FLOAT32_MAX:.2g} (the "
                         f"float32 weights' largest), got {start_lr:g} and {end_lr:g}")
    if math.isinf(end_lr / start_lr):  # each step multiplies the LR by a power of it
        raise ValueError(f"--end-lr / --start-lr ({end_lr:g} / {start_lr:g}) overflows to "
                         f"infinity; raise --start-lr (the default is {START_LR:g})")
    if iterations < MIN_ITERATIONS:  # a shorter sweep suggests its first LR, confidently
        raise ValueError(f"--iterations must be at least {MIN_ITERATIONS}: the first {SKIP} "
                         f"steps are not searched for the steepest slope, got {iterations}")
    if iterations > MAX_ITERATIONS:  # the LR would creep for days before the loss moved
        raise ValueError(f"--iterations must be at most {MAX_ITERATIONS:,} (the default is "
                         f"{ITERATIONS}), got {iterations:,}")

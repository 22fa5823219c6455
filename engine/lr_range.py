"""An LR range test on a real training run, leaving the run exactly as it found it.

The LR grows exponentially from start_lr to end_lr, one training step per value, while the
loss is recorded and smoothed; the sweep stops once training diverges. Weights, BatchNorm
buffers, optimizer, schedule and loss scaler are restored bit-exact afterwards, so the same run
can then train for real. The test is Smith's ("Cyclical Learning Rates for Training Neural
Networks", 2017, sec. 3.3, which raises the LR linearly and watches accuracy); the exponential
sweep on the loss, its smoothing and divergence rule follow fastai's lr_find, and its two
suggestions are fastai's `steep` and `minimum` (its defaults in earlier fastai 2 releases; its
default is now `valley`).
"""

from __future__ import annotations

import copy
import itertools
import math
from contextlib import closing
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from common.errors import RangeTestError
from common.progress import progress_bar
from engine.lr_sweep import END_LR, ITERATIONS, SKIP, START_LR, check_sweep
from engine.run import Run, endless, run_schedule, train_step

BETA = 0.98  # smoothing of the loss: an average over the last ~50 steps
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of the best one
# a minimum less than this fraction below the first step's smoothed loss is a flat curve's
# noise, not where the loss stops improving (ours: fastai suggests from any minimum)
FELL = 0.05


@dataclass
class RangeTest:
    """One sweep: the LR of every step, its loss, the smoothed loss and both suggestions."""

    lrs: list[float]
    losses: list[float]  # mean training loss of each step's batch, before its update
    smoothed: list[float]  # bias-corrected exponential moving average of `losses`
    steepest: float  # LR of the most negative slope of smoothed loss against log LR
    min_over_10: float  # a tenth of the LR at the smoothed loss's minimum
    diverged: bool  # stopped early: smoothed loss above DIVERGE x its best, or not finite

    @property
    def suggested(self) -> float:
        """min_over_10: it rests on the curve's minimum, not on the slope of a noisy curve.

        The steepest point moves with every bump of a short, noisy sweep; the minimum is where
        the loss has just stopped improving, so a tenth of it is still well inside the region
        where training makes fast progress (fastai's original lr_min rule).
        """
        return self.min_over_10

    @property
    def caveat(self) -> str | None:
        """Why the suggestion is a guess, or None: a sweep that never diverged and whose loss
        never fell (or hardly: FELL), or still fell at its last LR, never saw where the loss
        stops improving, so the minimum the suggestion rests on is the sweep's edge or noise."""
        low = int(np.argmin(self.smoothed))
        if self.diverged:
            return None
        if low == 0:
            return ("but the loss never fell below its first step's, so the suggestion is the "
                    "sweep's start: widen the sweep (tools/lr_find.py --start-lr, --end-lr)")
        if low == len(self.smoothed) - 1:
            return (f"but the loss still fell at the sweep's last lr {self.lrs[-1]:.2g}, so its "
                    "minimum, and with it the suggestion, lie higher: sweep to higher LRs "
                    "(tools/lr_find.py --end-lr)")
        fell = 1 - self.smoothed[low] / self.smoothed[0]  # above 0: the first is not the lowest
        if fell < FELL:
            return (f"but the loss hardly moved (its lowest {fell:.1%} below its first step's), "
                    "so the minimum the suggestion rests on is noise: widen the sweep "
                    "(tools/lr_find.py --start-lr, --end-lr)")
        return None

    def record(self) -> dict:
        """The suggestions as config.json keeps them (TrainConfig.lr_auto)."""
        return dict(suggested=self.suggested, steepest=self.steepest,
                    min_over_10=self.min_over_10)


def exponential(step: int, ratio: float, iterations: int) -> float:
    """LR multiplier of sweep step `step`: 1 at the first step, `ratio` at the last."""
    return ratio ** (step / (iterations - 1))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Make `lr` every group's current and base LR, the one a LambdaLR built next multiplies."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr


def snapshot(run: Run) -> dict:
    """Deep copies of what a step changes (weights, BN buffers, optimizer, scaler), and the
    schedule, loader epoch and model mode the sweep swaps out."""
    scaler = run.scaler
    return dict(model=copy.deepcopy(run.model.state_dict()),
                optimizer=copy.deepcopy(run.optimizer.state_dict()),
                scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
                scheduler=run.scheduler, epoch=run.train_loader.epoch,
                training=run.model.training)


def restore(run: Run, saved: dict) -> None:
    """Put back what `snapshot` took: the run continues as if the sweep had never happened."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"] is not None:
        run.scaler.load_state_dict(saved["scaler"])
    run.scheduler = saved["scheduler"]
    run.train_loader.set_epoch(saved["epoch"])
    run.model.train(saved["training"])


def suggestions(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest, min_over_10), both within the sweep.

    The slope (central differences over the whole curve) is searched on the descent up to
    the minimum, past which the loss rises, skipping the first SKIP points, where the average
    still rests on a few batches; a tenth of the minimum's LR is not taken below start_lr.
    """
    low = int(np.argmin(smoothed))
    if low == 0:  # the loss never fell: nothing is safer than the start
        return lrs[0], lrs[0]
    slope = np.gradient(np.asarray(smoothed), np.log(lrs))
    first = min(SKIP, low - 1)
    return lrs[first + int(np.argmin(slope[first:low + 1]))], max(lrs[low] / 10, lrs[0])


def diverging(smoothed: list[float]) -> bool:
    """The sweep's stop: its smoothed loss past DIVERGE times the lowest so far (fastai's
    rule; not its first: a loss that fell far and climbs back diverged before passing that)."""
    return smoothed[-1] > DIVERGE * min(smoothed)


def sweep(run: Run, start_lr: float, end_lr: float,
          iterations: int) -> tuple[list[float], list[float], list[float], bool]:
    """Train at exponentially growing LRs; (lrs, losses, smoothed, diverged)."""
    set_lr(run.optimizer, start_lr)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, partial(exponential, ratio=end_lr / start_lr, iterations=iterations))
    run.model.train()
    lrs, losses, smoothed, average = [], [], [], 0.0
    bar = progress_bar(iterations, "LR range test", "step",
                       enabled=run.accelerator.is_local_main_process)
    with closing(endless(run)) as batches, bar:
        for images, labels in itertools.islice(batches, iterations):
            lr = run.optimizer.param_groups[0]["lr"]
            loss_sum, _ = train_step(run, images, labels)
            # the mean over processes, so that every process stops at the same step
            loss = run.accelerator.reduce(loss_sum / len(labels), "mean").item()
            if not math.isfinite(loss):
                return lrs, losses, smoothed, True
            # averaged as its difference from the first loss, so that a flat curve stays flat:
            # an average of the losses themselves dipped 3e-15 below a constant loss at its
            # second step (the bias correction's rounding), a minimum that hid "never fell"
            average = BETA * average + (1 - BETA) * (loss - losses[0] if losses else 0.0)
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(losses[0] + average / (1 - BETA ** len(losses)))
            bar.update()
            bar.set_postfix(lr=f"{lr:.2g}", loss=f"{smoothed[-1]:.3f}")
            if diverging(smoothed):
                return lrs, losses, smoothed, True
    return lrs, losses, smoothed, False


def range_test(run: Run, start_lr: float = START_LR, end_lr: float = END_LR,
               iterations: int = ITERATIONS) -> RangeTest:
    """Sweep the LR on `run` with the engine's own training step, then restore the run."""
    check_sweep(start_lr, end_lr, iterations)
    saved = snapshot(run)
    try:
        lrs, losses, smoothed, diverged = sweep(run, start_lr, end_lr, iterations)
    finally:
        restore(run, saved)
    if len(lrs) < 2:
        raise RangeTestError(
            f"the training loss was not finite within the first steps of the LR range test "
            f"(from lr {start_lr:g}); check the data, or lower the start of the sweep.")
    if diverged and int(np.argmin(smoothed)) == 0:
        raise never_fell(run, lrs, iterations)
    return RangeTest(lrs, losses, smoothed, *suggestions(lrs, smoothed), diverged=diverged)


def never_fell(run: Run, lrs: list[float], iterations: int) -> RangeTestError:
    """The error for a sweep that diverged before its loss ever fell below its first step's:
    no LR of it trained, and its start, the suggestion suggestions() would make, diverges
    in training too."""
    if run.cfg.decay_to_blame():
        fix = f"use a --weight-decay far below 1 (the sweep ran with {run.cfg.weight_decay:.3g})"
    else:
        fix = (f"start the sweep lower than lr {lrs[0]:.2g}, or sweep in finer steps (more "
               "--iterations, or a narrower range)")
    return RangeTestError(
        f"the LR range test diverged at lr {lrs[-1]:.2g} (step {len(lrs)} of {iterations}) "
        f"before its loss ever fell below the first step's: no LR it tried trains, so it has "
        f"none to suggest; {fix}.")


def use_suggestion(run: Run) -> RangeTest:
    """--lr auto: range-test the run, then make the suggestion the peak of its schedule.

    Every schedule of engine.optimizers peaks at the groups' base LR, so the suggestion becomes
    the peak LR of the default triangular schedule (Keller Jordan's shape) or of
    `--schedule onecycle`; an explicit --schedule is kept as chosen. run.cfg records it.
    """
    result = range_test(run)
    set_lr(run.optimizer, result.suggested)
    cfg = run.cfg = replace(run.cfg, lr=result.suggested, lr_auto=result.record())
    run.scheduler = run_schedule(cfg, run.optimizer, len(run.train_loader))
    return result


def found(result: RangeTest) -> str:
    """What a sweep found, for tools/lr_find.py and --lr auto alike."""
    text = (f"LR range test: {len(result.lrs)} steps from {result.lrs[0]:.2g} to "
            f"{result.lrs[-1]:.2g}; suggested lr {result.suggested:.3g} (min/10; steepest "
            f"{result.steepest:.3g})")
    return f"{text}, {result.caveat}" if result.caveat else text


def describe(result: RangeTest, schedule: str) -> str:
    """One line on what --lr auto found and did."""
    return f"{found(result)}, the peak of the {schedule} schedule"

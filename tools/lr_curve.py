"""The LR range test's curve: swept on the run engine/train.py would build, and written as
lr_find.csv and lr_find.png (tools/lr_find.py is its command line)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from common.atomic import atomic_writes, check_replaceable, csv_text, text_writer
from common.output_folders import output_dir
from engine import lr_range
from engine.config import TrainConfig
from engine.launch import end_processes, make_accelerator, resolved_here
from engine.lr_range import RangeTest
from engine.run import build


def find(cfg: TrainConfig, start_lr: float, end_lr: float,
         iterations: int) -> tuple[RangeTest, bool]:
    """The range test on the run engine/train.py would build; (result, is main process)."""
    # a number, not 'auto': the sweep sets the LR itself
    cfg = resolved_here(replace(cfg, lr=start_lr))
    accelerator = make_accelerator(cfg)
    run = build(cfg, accelerator)
    return (lr_range.range_test(run, start_lr, end_lr, iterations),
            accelerator.is_main_process)


def rows(result: RangeTest) -> list[dict]:
    """lr_find.csv: one row per sweep step."""
    return [dict(lr=lr, loss=loss, smoothed=smooth) for lr, loss, smooth
            in zip(result.lrs, result.losses, result.smoothed, strict=True)]


def plot(result: RangeTest) -> Figure:
    """Loss against LR on a log axis, raw and smoothed, with both suggestions marked."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.7", lw=1, label="loss of each step")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2,
            label=f"smoothed (EMA {lr_range.BETA})")
    ax.axvline(result.steepest, color="C1", ls="--",
               label=f"steepest descent: {result.steepest:.3g}")
    ax.axvline(result.min_over_10, color="C2", ls="--",
               label=f"minimum / 10: {result.min_over_10:.3g} (suggested)")
    ax.set_xscale("log")
    # the curve, not the loss of the step that diverged (thousands): cut at 1.5x the start
    # above, and at the lowest point below, where matplotlib's margin grew with that loss
    top = min(max(result.losses), 1.5 * result.smoothed[0]) * 1.02
    low = min(*result.losses, *result.smoothed)
    ax.set_ylim(low - 0.02 * (top - low), top)
    ax.set(xlabel="learning rate", ylabel="training loss",
           title=f"LR range test: suggested lr {result.suggested:.3g}"
                 + (f" (diverged at {result.lrs[-1]:.2g})" if result.diverged else ""))
    ax.legend()
    return fig


def write_lr_curve(cfg: TrainConfig, start_lr: float, end_lr: float,
                   iterations: int) -> RangeTest | None:
    """Sweep the LR on cfg's run and write lr_find.csv and lr_find.png into cfg.out; the
    result, or None in a process other than the one that writes."""
    out = Path(cfg.out)
    # a bad --out is found now, not after the sweep; a folder made here goes again when the
    # sweep or the writes after it fail (a full disk)
    csv, png = out / "lr_find.csv", out / "lr_find.png"
    with output_dir(out):
        check_replaceable((csv, png))  # a folder in their place: said now, not after the sweep
        try:
            result, main_process = find(cfg, start_lr, end_lr, iterations)
        finally:  # the process group torchrun's processes joined, left as train() leaves it
            end_processes()
        if not main_process:
            return None
        fig = plot(result)
        # the table and its plot together: a full disk leaves neither new, not one of them
        atomic_writes({csv: text_writer(csv_text(rows(result))),
                       png: lambda tmp: fig.savefig(tmp, format="png", dpi=120)})
    return result

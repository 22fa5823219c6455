"""`python tools/lr_find.py [training options]`: the LR range test on the real training setup.

Sweeps the LR exponentially from --start-lr to --end-lr with engine/train.py's own model, data,
optimizer and training step, and writes lr_find.png (loss against LR, both suggestions marked)
and lr_find.csv (lr, loss, smoothed) into --out; prints the suggested LR.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, run_main

with interruptible_imports():  # torch and the rest take seconds to import
    import torch
    from matplotlib.figure import Figure

    from common.files import atomic_writes, csv_text, output_dir
    from engine import lr_range
    from engine.config import TrainConfig, parse_tool_args, resolve
    from engine.lr_range import RangeTest
    from engine.run import build, make_accelerator


def own_options() -> argparse.ArgumentParser:
    """The sweep's options; parse_tool_args adds engine/train.py's, which set up the run."""
    p = CommandParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("range test")
    g.add_argument("--start-lr", type=float, default=lr_range.START_LR,
                   help=f"first LR of the sweep (default: {lr_range.START_LR:g})")
    g.add_argument("--end-lr", type=float, default=lr_range.END_LR,
                   help=f"last LR of the sweep (default: {lr_range.END_LR:g})")
    g.add_argument("--iterations", type=int, default=lr_range.ITERATIONS,
                   help=f"training steps of the sweep, over as many epochs as needed; it stops "
                        f"early once the loss diverges (default: {lr_range.ITERATIONS}; at least "
                        f"{lr_range.MIN_ITERATIONS})")
    return p


# training options the sweep has no use for: it sets the LR itself, step by step, for
# --iterations steps, and never evaluates; given, they would be ignored without a word
UNUSED = ("lr", "epochs", "schedule", "warmup", "tta", "log_with")


def check(args: argparse.Namespace) -> None:
    """Raise ValueError for a sweep that cannot run or a training option it would ignore."""
    lr_range.check_sweep(args.start_lr, args.end_lr, args.iterations)
    given = [f"--{name.replace('_', '-')}" for name in UNUSED if getattr(args, name) is not None]
    if given:
        them = "them" if len(given) > 1 else "it"
        raise ValueError(f"{', '.join(given)}: the range test does not use {them} (it sweeps "
                         "the LR from --start-lr to --end-lr over --iterations steps and never "
                         f"evaluates); leave {them} out here, and pass {them} to engine/train.py")


def find(cfg: TrainConfig, args: argparse.Namespace) -> tuple[RangeTest, bool]:
    """The range test on the run engine/train.py would build; (result, is main process)."""
    # a number, not 'auto': the sweep sets the LR itself
    cfg = resolve(replace(cfg, lr=args.start_lr), torch.cuda.is_available())
    accelerator = make_accelerator(cfg)
    run = build(cfg, accelerator)
    return (lr_range.range_test(run, args.start_lr, args.end_lr, args.iterations),
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
    ax.set_ylim(top=min(max(result.losses), 1.5 * result.smoothed[0]) * 1.02)
    ax.set(xlabel="learning rate", ylabel="training loss",
           title=f"LR range test: suggested lr {result.suggested:.3g}"
                 + (f" (diverged at {result.lrs[-1]:.2g})" if result.diverged else ""))
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Run the range test and write lr_find.csv and lr_find.png with the suggested LR, so the
    LR is chosen from this setup's own losses."""
    args, cfg = parse_tool_args(argv, "tools/lr_find.py", __doc__.splitlines()[0], own_options(),
                                check)

    def body() -> None:
        out = Path(cfg.out)
        with output_dir(out):  # a bad --out is found now, not after the sweep
            result, main_process = find(cfg, args)
        if not main_process:
            return
        fig = plot(result)
        # the table and its plot together: a full disk leaves neither new, not one of them
        atomic_writes({out / "lr_find.csv": lambda tmp: tmp.write_text(csv_text(rows(result))),
                       out / "lr_find.png": lambda tmp: fig.savefig(tmp, format="png", dpi=120)})
        print(f"suggested lr {result.suggested:.4g} (minimum/10; steepest descent at "
              f"{result.steepest:.4g}) over {len(result.lrs)} steps from {result.lrs[0]:.2g} "
              f"to {result.lrs[-1]:.2g}; wrote {out}/lr_find.png and lr_find.csv. Train with "
              f"--lr {result.suggested:.3g}, or let engine/train.py --lr auto find it.")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""`python tools/lr_find.py [training options]`: the LR range test on the real training setup.

Sweeps the LR exponentially from --start-lr to --end-lr with engine/train.py's own model, data,
optimizer and training step, and writes lr_find.png (loss against LR, both suggestions marked)
and lr_find.csv (lr, loss, smoothed) into --out; prints the suggested LR.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from matplotlib.figure import Figure

from engine import lr_range
from engine.config import TrainConfig, parse_tool_args
from engine.lr_range import RangeTest
from engine.train import TrainingError, build, make_accelerator, train_step
from loaders.cifar import DataError
from loaders.files import atomic_write


def own_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("range test")
    g.add_argument("--start-lr", type=float, default=lr_range.START_LR,
                   help=f"first LR of the sweep (default: {lr_range.START_LR:g})")
    g.add_argument("--end-lr", type=float, default=lr_range.END_LR,
                   help=f"last LR of the sweep (default: {lr_range.END_LR:g})")
    g.add_argument("--iterations", type=int, default=lr_range.ITERATIONS,
                   help=f"training steps of the sweep, over as many epochs as needed; it stops "
                        f"early once the loss diverges (default: {lr_range.ITERATIONS})")
    return p


def find(cfg: TrainConfig, args: argparse.Namespace) -> tuple[RangeTest, bool]:
    """The range test on the run engine/train.py would build; (result, is main process)."""
    cfg.lr = args.start_lr  # a number: the sweep sets the LR, and build must not run --lr auto
    accelerator = make_accelerator(cfg)
    run = build(cfg, accelerator)
    return (lr_range.range_test(run, train_step, args.start_lr, args.end_lr, args.iterations),
            accelerator.is_main_process)


def write_csv(result: RangeTest, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["lr", "loss", "smoothed"])
    writer.writerows(zip(result.lrs, result.losses, result.smoothed, strict=True))
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def plot(result: RangeTest, path: Path) -> None:
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_tool_args(argv, "tools/lr_find.py", __doc__.splitlines()[0], own_options(),
                                lambda a: lr_range.check_sweep(a.start_lr, a.end_lr, a.iterations))
    try:
        result, main_process = find(cfg, args)
    except (DataError, TrainingError, lr_range.RangeTestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    if main_process:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(result, out / "lr_find.csv")
        plot(result, out / "lr_find.png")
        print(f"suggested lr {result.suggested:.4g} (minimum/10; steepest descent at "
              f"{result.steepest:.4g}) over {len(result.lrs)} steps from {result.lrs[0]:.2g} "
              f"to {result.lrs[-1]:.2g}; wrote {out}/lr_find.png and lr_find.csv. Train with "
              f"--lr {result.suggested:.3g}, or let engine/train.py --lr auto find it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python tools/lr_find.py [training options]`: the LR range test on the real training setup.

Sweeps the LR exponentially from --start-lr to --end-lr with engine/train.py's own model, data,
optimizer and training step, and writes lr_find.png (loss against LR, both suggestions marked)
and lr_find.csv (lr, loss, smoothed) into --out; prints the suggested LR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, option_name, run_main, summary
from common.streams import say
from common.wording import noun
from engine import lr_sweep
from engine.options import parse_tool_args


def own_options() -> argparse.ArgumentParser:
    """The sweep's options; parse_tool_args adds engine/train.py's, which set up the run."""
    p = CommandParser(add_help=False)
    g = p.add_argument_group("range test")
    g.add_argument("--start-lr", type=float, default=lr_sweep.START_LR,
                   help=f"first LR of the sweep (default: {lr_sweep.START_LR:g})")
    g.add_argument("--end-lr", type=float, default=lr_sweep.END_LR,
                   help=f"last LR of the sweep (default: {lr_sweep.END_LR:g})")
    g.add_argument("--iterations", type=int, default=lr_sweep.ITERATIONS,
                   help=f"training steps of the sweep, over as many epochs as needed; it stops "
                        f"early once the loss diverges (default: {lr_sweep.ITERATIONS}; at least "
                        f"{lr_sweep.MIN_ITERATIONS}, at most {lr_sweep.MAX_ITERATIONS:,})")
    return p


# training options the sweep has no use for: it sets the LR itself, step by step, for
# --iterations steps, and never evaluates; given, they would be ignored without a word, so
# check refuses them
REFUSED_OPTIONS = ("lr", "epochs", "schedule", "warmup", "tta", "log_with")
SWEEP = "it sweeps the LR from --start-lr to --end-lr over --iterations steps and never evaluates"
# what --help says of each of them, which it would otherwise describe as training takes it
REFUSED_HELP = f"the range test does not use it ({SWEEP}); pass it to engine/train.py"


def check(args: argparse.Namespace) -> None:
    """Raise ValueError for a sweep that cannot run or a training option it would ignore."""
    lr_sweep.check_sweep(args.start_lr, args.end_lr, args.iterations)
    values = {name: getattr(args, name) for name in REFUSED_OPTIONS}
    # as typed: --no-tta for a switch turned off
    given = [option_name(f"no_{name}" if value is False else name)
             for name, value in values.items() if value is not None]
    if given:
        them = noun(len(given), "it", "them")
        raise ValueError(f"{', '.join(given)}: the range test does not use {them} ({SWEEP}); "
                         f"leave {them} out here, and pass {them} to engine/train.py")


def main(argv: list[str] | None = None) -> int:
    """Run the range test and write lr_find.csv and lr_find.png with the suggested LR, so the
    LR is chosen from this setup's own losses."""
    # first: --help and a refused option answer before torch loads
    args, cfg = parse_tool_args(argv, "tools/lr_find.py", summary(__doc__), own_options(),
                                check, REFUSED_OPTIONS,
                                dict.fromkeys(REFUSED_OPTIONS, REFUSED_HELP))
    with interruptible_imports():  # torch and the rest take seconds to import
        from engine.lr_range import found
        from tools.lr_curve import write_lr_curve

    def body() -> None:
        result = write_lr_curve(cfg, args.start_lr, args.end_lr, args.iterations)
        if result is None:  # another process writes and says so
            return
        say(f"{found(result)}; wrote {Path(cfg.out)}/lr_find.png and lr_find.csv. Train with "
            f"--lr {result.suggested:.3g}, or let engine/train.py --lr auto find it.")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

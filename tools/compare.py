"""`python tools/compare.py --optimizers sgd adamw ... [training options]`: optimizers side by side.

Trains one run per optimizer with engine/train.py's own training loop, from the same seed, data
and options, each at its own LR: BASE_LRS in tools/comparison.py, `--lr auto` (the range
test's suggestion for each optimizer) or one `--lr X` for all; at BASE_LRS (no --lr), with no
--weight-decay given, AdamW's decoupled decay is scaled to its LR. Each run keeps its directory in
--out/<optimizer>/ (the same command run again resumes a stopped run there, and reuses a
finished one); compare.png overlays train loss, test accuracy and LR per epoch, and compare.csv
and compare.md give each optimizer's LR, final and best test accuracy and seconds per epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, run_main, summary
from common.streams import error_line, say, write_stdout
from engine.config import OPTIMIZERS
from engine.options import parse_tool_args

# training options each run takes from its optimizer (or refuses: --optimizers replaces
# --optimizer), not from the preset
DECIDED = ("optimizer", "lr", "weight_decay")


def own_options() -> argparse.ArgumentParser:
    """--optimizers, the one option of this tool; parse_tool_args adds engine/train.py's."""
    p = CommandParser(add_help=False)
    g = p.add_argument_group("comparison")
    g.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                   metavar="NAME",
                   help=f"optimizers to train, each once: {', '.join(OPTIMIZERS)} (default: "
                        "all). Without --lr each takes its own LR (BASE_LRS in "
                        "tools/comparison.py), and without --weight-decay too, AdamW a "
                        "weight decay scaled to its LR (default_weight_decay there)")
    # not an option: taken only to say what does engine/train.py's --resume here
    p.add_argument("--resume", type=Path, help=argparse.SUPPRESS)
    return p


def check(args: argparse.Namespace) -> None:
    """Each optimizer once: every run has its own directory; and no --optimizer, which
    --optimizers replaces here, nor --resume, which the same command with --out replaces."""
    if args.resume is not None:
        raise ValueError(f"--resume {args.resume}: this tool goes on where it stopped when run "
                         f"again with the same options and --out {args.resume}, which resumes "
                         "its runs or reuses finished ones")
    if args.optimizer is not None:
        raise ValueError(f"--optimizer {args.optimizer}: this tool trains each of --optimizers; "
                         f"pass --optimizers {args.optimizer}")
    if len(set(args.optimizers)) < len(args.optimizers):
        raise ValueError(f"--optimizers names one twice: {' '.join(args.optimizers)}")


def main(argv: list[str] | None = None) -> int:
    """Train each optimizer in turn and write the comparison; exit 1 if any run failed, so a
    script sees an incomplete table."""
    # first: --help and a refused option answer before torch loads
    args, cfg = parse_tool_args(argv, "tools/compare.py", summary(__doc__),
                                own_options(), check, DECIDED,
                                {"optimizer": "this tool trains each of --optimizers"})
    with interruptible_imports():  # torch and the rest take seconds to import
        from tools.comparison import compare

    def body() -> int:
        # each its own weight decay only beside its own LR: AdamW's is scaled to its LR
        results, table = compare(cfg, args.optimizers, args.lr is None,
                                 args.lr is None and args.weight_decay is None, log=say,
                                 warn=error_line)
        if table is not None:  # None: another process writes
            write_stdout(table)
            say(f"wrote {Path(cfg.out)}/compare.png, compare.csv, compare.md")
        return 1 if any(r.note for r in results) else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""`python tools/report.py ckpt.pt`: turn a training run into pictures a person can read.

Writes curves.png, misclassified.png (+ .csv), gradcam.pdf, confusion.png, per_class.csv,
faithfulness.csv and summary.md into a report folder (default: report/ beside a run's ckpt.pt,
report-best/ beside best.pt, report-<name>/ beside any other checkpoint file).
Everything is written into a temporary folder beside it and renamed into place at the end, so
a failed run never leaves a half report, and an older report is replaced only by a complete
one. A folder is replaced only when it is a report's own: the report's files and nothing else,
with the .cifar10-report file each report writes (or, from before it, the report's
summary.md); any other folder is refused. The temporary folder of a report that was killed is
removed by the next report into the same folder.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import CommandParser, interruptible_imports, path_option, positive, run_main
from common.streams import say
from tools.options import (
    METHODS,
    add_checkpoint_argument,
    add_data_dir_option,
    add_device_option,
    pick_device,
)

LAYERS = ("layer2", "layer3", "layer4")  # --layers' default
CAM_METHODS = ("gradcam",)  # --methods' default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = CommandParser(prog="python tools/report.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("--out", type=path_option("replace the current directory"),
                        default=None, metavar="DIR",
                        help="report folder, replaced when complete, and only if it is a "
                             "report's own (default: report/ beside a ckpt.pt, report-NAME/ "
                             "beside any other NAME.pt, such as report-best/ for best.pt)")
    add_data_dir_option(parser)
    parser.add_argument("-n", type=positive(int), default=20,
                        help="misclassified images to show and explain (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), metavar="NAME",
                        help=f"model layers to explain (default: {' '.join(LAYERS)})")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(CAM_METHODS),
                        metavar="NAME",
                        help=f"CAM methods: {', '.join(METHODS)} (default: "
                             f"{' '.join(CAM_METHODS)})")
    add_device_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 1 with a one-paragraph error on stderr."""
    args = parse_args(argv)  # first: --help and a refused option answer before torch loads
    with interruptible_imports():  # torch and the rest take seconds to import
        from tools.report_folder import FILES, memory_advice, write_report_folder

    def body() -> None:
        device = pick_device(args.device)
        with memory_advice(device):
            out = write_report_folder(args.checkpoint, args.out, args.data_dir, device, args.n,
                                      args.layers, args.methods)
        say(f"wrote {out}/: {', '.join(FILES)}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""`python tools/predict.py ckpt.pt IMAGE|FOLDER...`: classify your own pictures.

Each picture is converted to RGB and resized whole to 32 x 32 (loaders/images.py says how and
why), normalized with the checkpoint's mean/std exactly as evaluation does, and classified by
the checkpoint's model. Prints the top-k classes with probabilities (or --json); --cam DIR also
writes a Grad-CAM overlay per picture for its predicted class (of --layer), all or none of them.
A file that cannot be read is named on stderr and the others are still classified; the exit
code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, path_option, positive, run_main
from common.errors import escaped, listing
from common.streams import error_line, say
from common.wording import counted
from tools.options import add_checkpoint_argument, add_device_option, pick_device

CAM_LAYER = "layer3"  # --layer's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = CommandParser(prog="python tools/predict.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                        help="picture files (PNG, JPEG, ...) or folders of them")
    parser.add_argument("-k", type=positive(int), default=3,
                        help="classes to show per picture, all of them where the checkpoint "
                             "has fewer (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {file, predictions: [{class, probability}]} "
                             "(or {file, error}) instead of a table")
    parser.add_argument("--cam", type=path_option("write into the current directory"),
                        default=None, metavar="DIR",
                        help="write a Grad-CAM overlay PNG per picture for its predicted class")
    parser.add_argument("--layer", default=None,
                        help=f"with --cam: the model layer Grad-CAM explains (default: "
                             f"{CAM_LAYER})")
    add_device_option(parser)
    args = parser.parse_args(argv)
    if args.layer is not None and args.cam is None:  # it would be ignored without a word
        parser.error("--layer: only --cam draws Grad-CAM maps, so without it --layer would "
                     "be ignored; add --cam DIR or leave --layer out")
    if args.layer is None:
        args.layer = CAM_LAYER
    return args


def table(rows: list[dict]) -> str:
    """The top-k predictions as aligned columns: file, then `class probability` per rank."""
    # a file's name may hold a line break: escaped, each picture stays one row
    lines = [[escaped(r["file"])] + [f"{p['class']} {p['probability']:.1%}"
                                      for p in r["predictions"]]
             for r in rows if "predictions" in r]
    ranks = max((len(line) - 1 for line in lines), default=0)
    header = ["file"] + [f"top-{r + 1}" for r in range(ranks)]
    widths = [max(len(line[c]) for line in [header, *lines]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
                     .rstrip() for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 when every picture was classified, 1 otherwise."""
    args = parse_args(argv)  # first: --help and a refused option answer before torch loads
    with interruptible_imports():  # torch and the rest take seconds to import
        from tools.prediction import (
            cam_folder,
            load_classifier,
            memory_advice,
            read_pictures,
            renamed,
            top_classes,
            write_cams,
        )

    def body() -> int:
        device = pick_device(args.device)
        with memory_advice(device, args.cam is not None):
            classifier = load_classifier(args.checkpoint, device)
            with cam_folder(classifier, args.layer, args.cam):
                pictures = read_pictures(args.images)
                for message in pictures.errors.values():
                    error_line(f"error: {message}")
                rows, predicted = top_classes(classifier, pictures, args.k)
                if args.json or pictures.readable:  # a table of no picture: a lone header
                    say(json.dumps(rows, indent=2) if args.json else table(rows))
                if args.cam is not None and pictures.readable:
                    names = write_cams(classifier, pictures, predicted, args.layer, args.cam)
                    moved = renamed(pictures.readable, names)  # which picture is which
                    which = f"; {listing(moved, 5, '; ')}" if moved else ""
                    error_line(f"wrote {counted(len(names), 'Grad-CAM overlay')} ({args.layer}) "
                               f"to {args.cam}/{which}")
        return 1 if pictures.errors else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

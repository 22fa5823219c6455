"""`python tools/export.py ckpt.pt --format onnx|torchscript|safetensors`: the trained model
as a file other programs can run, with its class names and normalization.

After writing, the exported file is loaded back (onnxruntime, torch.jit.load, safetensors) and
compared with the checkpoint's own model on test images: logits within 1e-4 x max(1, the largest
|logit|), fp32's rounding, and the same top-1 class wherever the top two logits are more than
twice that apart (tools/export_model.py, TOLERANCE).
The file is written under a temporary name and renamed only when the check passes, so a failed
export leaves nothing. tools/export_formats.py states each format's input contract.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import CommandParser, interruptible_imports, path_option, run_main
from common.streams import error_line, say
from tools.export_formats import PACKAGES
from tools.options import add_checkpoint_argument, add_data_dir_option


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = CommandParser(prog="python tools/export.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("--format", required=True, choices=list(PACKAGES),
                        help="onnx (onnxruntime), torchscript (torch.jit.load) or safetensors "
                             "(weights only)")
    parser.add_argument("--out", type=path_option("name the current directory"), default=None,
                        metavar="FILE",
                        help="where to write (default: beside the checkpoint, e.g. ckpt.onnx)")
    add_data_dir_option(parser, "for the check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 when the export was written and checked, 1 otherwise."""
    args = parse_args(argv)  # first: --help and a refused option answer before torch loads
    with interruptible_imports():  # torch and the rest take seconds to import
        from tools.export_model import export, memory_advice

    def body() -> None:
        with memory_advice(args.checkpoint):
            out, check = export(args.checkpoint, args.format, args.out, args.data_dir,
                                warn=error_line)
        say(check)
        say(f"wrote {out}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

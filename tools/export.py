"""`python tools/export.py ckpt.pt --format onnx|torchscript|safetensors`: the trained model
as a file other programs can run, with its class names and normalization.

After writing, the exported file is loaded back (onnxruntime, torch.jit.load, safetensors) and
compared with the checkpoint's own model on test images: the same top-1 class and logits within
TOLERANCE. The file is written under a temporary name and renamed only when the check passes,
so a failed export leaves nothing. tools/export_formats.py states each format's input contract.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, path_option, run_main

with interruptible_imports():  # torch and the rest take seconds to import
    import numpy as np
    import torch

    from common.errors import EngineError, ExportError
    from common.files import atomic_write
    from engine import checkpoint
    from loaders import beton
    from tools.export_formats import PACKAGES, RUNNERS, SUFFIX, WRITERS, metadata, require
    from tools.options import add_checkpoint_argument, add_data_dir_option
    from tools.report_inputs import evaluation_input, locate_test_data

CHECK_IMAGES = 256  # test images the export is checked on
TOLERANCE = 1e-4  # max |logit difference|, relative to max(1, largest |logit|): fp32 rounding


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


def holds_checkpoint(path: Path) -> bool:
    """Whether `path` is a cifar10-engine checkpoint: torch's zip whose pickle holds the format
    marker. Cheap (no tensor is read) and safe for any file (nothing is unpickled)."""
    marker = checkpoint.FORMAT.encode()
    try:
        with zipfile.ZipFile(path) as archive:
            return any(marker in archive.read(name) for name in archive.namelist()
                       if name.rpartition("/")[2] == "data.pkl")
    except (OSError, zipfile.BadZipFile):
        return False


def check_out(out: Path, source: Path, default: Path) -> None:
    """Refuse an --out that would replace the checkpoint being exported or another one: a run
    overwritten by its export can no longer be resumed, evaluated or exported again."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; name the file to write.")
    if out.resolve() == source.resolve():
        what = "is the checkpoint being exported"
    elif out.is_file() and holds_checkpoint(out):
        what = "is a cifar10-engine checkpoint"
    else:
        return
    raise ExportError(f"--out {out} {what}; the export would overwrite it. Choose another "
                      f"--out (the default is {default}).")


def check_images(ckpt: dict, path: Path, data_dir: Path | None) -> tuple[np.ndarray, str]:
    """Images for the check and what they are: test images, or noise when those are gone."""
    try:
        test = locate_test_data(ckpt, path, data_dir)
        return beton.read(test).images[:CHECK_IMAGES], f"{test}"
    except EngineError as error:
        if data_dir is not None:  # asked for explicitly: its failure is the user's to fix
            raise
        print(f"note: no test data to check with ({error}) Checking on {CHECK_IMAGES} uniform "
              "noise images instead.", file=sys.stderr)
        noise = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, 32, 32, 3), np.uint8)
        return noise, "uniform noise"


def reference_logits(ckpt: dict, model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The checkpoint's model on the images, normalized exactly as evaluation does."""
    to_input = evaluation_input(ckpt, "cpu")
    with torch.no_grad():
        return model(to_input(torch.from_numpy(images))).numpy()


def compare(ref: np.ndarray, got: np.ndarray, fmt: str, path: Path) -> str:
    """One line saying how well the export agrees; ExportError when it does not."""
    if got.shape != ref.shape:
        raise ExportError(f"{fmt} export gives logits of shape {got.shape}, the checkpoint's "
                          f"model {ref.shape}; nothing was written to {path}.")
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    limit = TOLERANCE * max(1.0, float(np.abs(ref).max()))
    # a top-1 flip is an error unless the reference's top two logits are within the tolerance
    ordered = np.sort(ref, axis=1)
    decided = ordered[:, -1] - ordered[:, -2] > 2 * limit
    flips = int(((got.argmax(1) != ref.argmax(1)) & decided).sum())
    line = (f"max |logit difference| {diff:.2e} (limit {limit:.2e}), top-1 differs on {flips} "
            f"of {len(ref)} images")
    if diff > limit or flips or not np.isfinite(got).all():
        raise ExportError(f"the {fmt} export does not match the checkpoint's model: {line}; "
                          f"nothing was written to {path}.")
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 when the export was written and checked, 1 otherwise."""
    args = parse_args(argv)

    def body() -> None:
        ckpt = checkpoint.load(args.checkpoint)  # first: a folder ('.', '/') has no file name
        default = args.checkpoint.with_suffix(SUFFIX[args.format])
        out = args.out or default
        check_out(out, args.checkpoint, default)
        require(args.format)
        model = checkpoint.model_from(ckpt, args.checkpoint)
        images, what = check_images(ckpt, args.checkpoint, args.data_dir)
        ref = reference_logits(ckpt, model, images)
        if not np.isfinite(ref).all():  # nothing to compare an export with
            raise ExportError(f"{args.checkpoint}'s model gives NaN or infinite logits; its "
                              "weights are broken (a diverged run?). Export another "
                              "checkpoint, e.g. the run's best.pt.")
        meta = metadata(ckpt, args.format, args.checkpoint.resolve())
        result: list[str] = []

        def write_and_check(tmp: Path) -> None:
            WRITERS[args.format](model, meta, tmp)
            result.append(compare(ref, RUNNERS[args.format](tmp, images), args.format, out))

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, write_and_check)  # renamed into place only once checked
        print(f"check on {len(images)} images ({what}): {result[0]}: OK")
        print(f"wrote {out}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

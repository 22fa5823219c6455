"""`python tools/predict.py ckpt.pt IMAGE|FOLDER...`: classify your own pictures.

Each picture is converted to RGB and resized whole to 32 x 32 (loaders/images.py says how and
why), normalized with the checkpoint's mean/std exactly as evaluation does, and classified by
the checkpoint's model. Prints the top-k classes with probabilities (or --json); --cam DIR also
writes a Grad-CAM overlay per picture for its predicted class. A file that cannot be read is
named on stderr and the others are still classified; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import CommandParser, error_line, interruptible_imports, path_option, run_main

with interruptible_imports():  # torch and the rest take seconds to import
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from common.errors import DataError
    from common.files import atomic_write, make_dir
    from common.progress import progress_bar
    from engine import checkpoint
    from loaders.augment import Augment
    from loaders.images import expand, read_image
    from tools.options import add_checkpoint_argument, add_device_option, pick_device
    from tools.report_figures import cams, overlay
    from tools.report_inputs import evaluation_input, layer_of

BATCH = 256  # pictures per forward pass
CAM_SCALE = 8  # overlays are written 8x enlarged (256 x 256), nearest-neighbour, to be seen
PROGRESS_FROM = 100  # pictures from which a progress bar is worth showing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = CommandParser(prog="python tools/predict.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                        help="picture files (PNG, JPEG, ...) or folders of them")
    parser.add_argument("-k", type=int, default=3, help="classes to show per picture (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {file, predictions: [{class, probability}]} "
                             "(or {file, error}) instead of a table")
    parser.add_argument("--cam", type=path_option("write into the current directory"),
                        default=None, metavar="DIR",
                        help="write a Grad-CAM overlay PNG per picture for its predicted class")
    parser.add_argument("--layer", default="layer3",
                        help="model layer Grad-CAM explains (default: layer3)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}")
    return args


def read_all(files: list[Path]) -> tuple[list[Path], np.ndarray, dict[Path, str]]:
    """The readable pictures as uint8 N x 32 x 32 x 3, and an error message per other file."""
    good, images, errors = [], [], {}
    with progress_bar(len(files), "reading", "image", enabled=len(files) >= PROGRESS_FROM) as bar:
        for path in files:
            try:
                images.append(read_image(path))
                good.append(path)
            except DataError as error:
                errors[path] = str(error)
            bar.update()
    return good, np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8), errors


def classify(model: nn.Module, augment: Augment, images: np.ndarray) -> torch.Tensor:
    """Softmax probabilities (N x C, on the CPU) of uint8 N x 32 x 32 x 3 pictures."""
    probs = []
    with torch.inference_mode(), progress_bar(len(images), "classifying", "image",
                                              enabled=len(images) >= PROGRESS_FROM) as bar:
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(images[start:start + BATCH]).to(augment.device)
            probs.append(model(augment(batch)).float().softmax(1).cpu())
            bar.update(len(batch))
    return torch.cat(probs)


def cam_names(files: list[Path]) -> list[str]:
    """One overlay file name per picture: its stem, numbered when two pictures share one."""
    names, seen = [], set()
    for path in files:
        name, n = f"{path.stem}.cam.png", 1
        while name in seen:
            n += 1
            name = f"{path.stem}-{n}.cam.png"
        seen.add(name)
        names.append(name)
    return names


def write_cams(model: nn.Module, augment: Augment, images: np.ndarray, predicted: np.ndarray,
               files: list[Path], layer: str, out: Path) -> None:
    """A Grad-CAM overlay PNG per picture for its predicted class, as report.py draws them."""
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        inputs = augment(torch.from_numpy(chunk).to(augment.device))
        maps = cams(model, inputs, predicted[start:start + BATCH], layer)
        for image, cam, name in zip(chunk, maps, cam_names(files)[start:start + BATCH],
                                    strict=True):
            big = Image.fromarray(overlay(image, cam)).resize(
                (32 * CAM_SCALE, 32 * CAM_SCALE), Image.Resampling.NEAREST)
            atomic_write(out / name, lambda tmp, big=big: big.save(tmp, format="PNG"))


def table(rows: list[dict], k: int) -> str:
    """The top-k predictions as aligned columns: file, then `class probability` per rank."""
    header = ["file"] + [f"top-{r + 1}" for r in range(k)]
    lines = [[r["file"]] + [f"{p['class']} {p['probability']:.1%}" for p in r["predictions"]]
             for r in rows if "predictions" in r]
    widths = [max(len(line[c]) for line in [header, *lines]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
                     .rstrip() for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 when every picture was classified, 1 otherwise."""
    args = parse_args(argv)

    def body() -> int:
        device = pick_device(args.device)
        ckpt = checkpoint.load(args.checkpoint)
        model = checkpoint.model_from(ckpt, args.checkpoint).to(device)
        if args.cam is not None:  # before any work: a CAM of fc fails only after predicting
            layer_of(model, args.layer, "--layer")
            make_dir(args.cam, "--cam")
        files = expand(args.images)
        if not files:
            raise DataError(f"no image files in {', '.join(map(str, args.images))}; pass PNG "
                            "or JPEG files or folders holding them.")
        good, images, errors = read_all(files)
        for message in errors.values():
            error_line(f"error: {message}")
        to_input = evaluation_input(ckpt, device)
        probs = classify(model, to_input, images) if len(good) else torch.zeros(0, 1)
        k = min(args.k, len(ckpt["classes"]))
        top = probs.topk(k, dim=1) if len(good) else None
        found = {path: [{"class": ckpt["classes"][int(c)], "probability": float(p)}
                        for p, c in zip(top.values[i], top.indices[i], strict=True)]
                 for i, path in enumerate(good)}
        rows = [{"file": str(path), "predictions": found[path]} if path in found
                else {"file": str(path), "error": errors[path]} for path in files]
        if args.json or good:  # a table of no picture would be a lone header
            print(json.dumps(rows, indent=2) if args.json else table(rows, k))
        if args.cam is not None and len(good):
            write_cams(model, to_input, images, probs.argmax(1).numpy(), good, args.layer,
                       args.cam)
            print(f"wrote {len(good)} Grad-CAM overlays ({args.layer}) to {args.cam}/",
                  file=sys.stderr)
        return 1 if errors else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

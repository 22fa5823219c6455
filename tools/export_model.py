"""Export a checkpoint's model to a format and check the file against the model before it is
renamed into place (tools/export.py is its command line)."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write
from common.errors import EngineError, ExportError
from common.output_folders import made_for
from common.paths import holds_checkpoint, long_name, not_a_file, resolved
from engine import checkpoint
from engine.failures import out_of_memory_as
from loaders import beton
from tools.export_formats import INPUT_01, INPUT_NORMALIZED, PACKAGES, SUFFIX
from tools.export_writers import RUNNERS, WRITERS
from tools.report_inputs import locate_test_data

CHECK_IMAGES = 256  # test images the export is checked on
TOLERANCE = 1e-4  # max |logit difference|, relative to max(1, largest |logit|): fp32 rounding


def require(fmt: str) -> None:
    """Refuse early, in one line, when the optional packages a format needs are missing."""
    missing = []
    for package in PACKAGES[fmt]:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}, which is not installed: "
                          f"pip install -e '.[export]' in the project's folder (or: make setup; "
                          f"or pip install {' '.join(PACKAGES[fmt])}).")


def metadata(ckpt: dict, fmt: str, source: Path) -> dict[str, str]:
    """What a user of the file needs besides the weights, as strings (all formats take those)."""
    return {"format": "cifar10-engine/export", "arch": ckpt["arch"], "width": str(ckpt["width"]),
            "num_classes": str(ckpt["num_classes"]), "classes": json.dumps(ckpt["classes"]),
            "mean": json.dumps(ckpt["mean"]), "std": json.dumps(ckpt["std"]),
            "input": INPUT_NORMALIZED if fmt == "safetensors" else INPUT_01,
            "output": "float32 N x num_classes logits",
            # a name's bytes that are not UTF-8 as \xNN: ONNX and safetensors take UTF-8 only
            "checkpoint": os.fsencode(source).decode("utf-8", "backslashreplace"),
            "epoch": str(ckpt.get("epoch", len(ckpt["history"])))}


def check_out(out: Path, source: Path, default: Path) -> None:
    """Refuse an --out that would replace the checkpoint being exported or another one: a run
    overwritten by its export can no longer be resumed, evaluated or exported again."""
    if problem := not_a_file(out):
        raise ExportError(f"--out {out} {problem}; name the file to write.")
    target = resolved(out, "--out")  # the file written, through a link
    if problem := long_name(target):
        raise ExportError(f"--out {out}: {problem}; choose a shorter name.")
    if target == source.resolve():  # the checkpoint was read: no loop
        what = "is the checkpoint being exported"
    elif out.is_file() and holds_checkpoint(out):
        what = "is a cifar10-engine checkpoint"
    else:
        return
    raise ExportError(f"--out {out} {what}; the export would overwrite it. Choose another "
                      f"--out (the default is {default}).")


def check_images(ckpt: dict, path: Path, data_dir: Path | None,
                 warn: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """Images for the check and what they are: test images, or noise (`warn` says so) when
    those are gone."""
    try:
        test = locate_test_data(ckpt, path, data_dir)
        return beton.read(test, full=True).images[:CHECK_IMAGES], f"{test}"
    except EngineError as error:
        if data_dir is not None:  # asked for explicitly: its failure is the user's to fix
            raise
        warn(f"note: no test data to check with ({error}) Checking on {CHECK_IMAGES} uniform "
             "noise images instead.")
        noise = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, 32, 32, 3), np.uint8)
        return noise, "uniform noise"


def reference_logits(ckpt: dict, model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The checkpoint's model on the images, normalized exactly as evaluation does."""
    to_input = checkpoint.model_input(ckpt, "cpu")
    with torch.no_grad():
        return model(to_input(torch.from_numpy(images))).numpy()


def agreement(ref: np.ndarray, got: np.ndarray, fmt: str, path: Path) -> str:
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


def memory_advice(path: Path) -> AbstractContextManager[None]:
    """For the block: running out of memory becomes one line. The export runs on the CPU,
    256 images at a time, with no option that would need less: the fix is free memory."""
    return out_of_memory_as(ExportError(
        f"out of memory exporting {path}; nothing was written. Close other programs to free "
        "memory, or export on a machine with more."))


def export(path: Path, fmt: str, out: Path | None, data_dir: Path | None,
           warn: Callable[[str], None]) -> tuple[Path, str]:
    """Write the model of checkpoint `path` in `fmt` to `out` (default: beside it) once it
    agrees with the checkpoint's own model; the file written and how well it agrees. `warn`
    hears of a fallback as it happens (the export takes seconds more)."""
    ckpt = checkpoint.load(path)  # first: a folder ('.', '/') has no file name
    default = path.with_suffix(SUFFIX[fmt])
    out = out or default
    check_out(out, path, default)
    require(fmt)
    model = checkpoint.model_from(ckpt)
    images, what = check_images(ckpt, path, data_dir, warn)
    ref = reference_logits(ckpt, model, images)
    if not np.isfinite(ref).all():  # nothing to compare an export with
        raise checkpoint.broken_outputs(path)
    meta = metadata(ckpt, fmt, path.resolve())
    result: list[str] = []

    def write_and_check(tmp: Path) -> None:
        WRITERS[fmt](model, meta, tmp)
        result.append(agreement(ref, RUNNERS[fmt](tmp, images), fmt, out))

    with made_for(out):  # the folders above it, removed again when nothing is written
        atomic_write(out, write_and_check)  # in place only once checked
    return out, f"check on {len(images)} images ({what}): {result[0]}: OK"

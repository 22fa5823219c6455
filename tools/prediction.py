"""Pictures classified by a checkpoint's model: each read as CIFAR input, its top-k classes,
and a Grad-CAM overlay for its predicted class (tools/predict.py is its command line)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.atomic import write_failed
from common.errors import DataError, ReportError, escaped
from common.output_folders import missing_folders, output_dir, remove_empty
from common.progress import progress_bar
from common.temporaries import sweep_dead_writers, temporary_name
from engine import checkpoint
from engine.evaluate import probabilities
from engine.failures import out_of_memory_as
from loaders.augment import Augment
from loaders.images import SUFFIXES, expand, read_image
from tools.cams import CAM_BATCH, cams, layer_of, overlay

CAM_SCALE = 8  # overlays are written 8x enlarged (256 x 256), nearest-neighbour, to be seen
PROGRESS_FROM = 100  # pictures from which a progress bar is worth showing


@dataclass
class Classifier:
    """A checkpoint's model on a device, with the input evaluation gives it."""

    model: nn.Module
    to_input: Augment  # uint8 N x 32 x 32 x 3 pictures -> the model's input
    classes: list[str]
    path: Path  # its checkpoint


def load_classifier(path: Path, device: torch.device) -> Classifier:
    """The model of checkpoint `path` on `device`."""
    ckpt = checkpoint.load(path)
    model = checkpoint.model_from(ckpt).to(device)
    return Classifier(model, checkpoint.model_input(ckpt, device), ckpt["classes"], path)


def memory_advice(device: torch.device, cam: bool) -> AbstractContextManager[None]:
    """For the block: running out of memory becomes one line naming what to lower, the
    pictures held at once, the Grad-CAMs (`cam`: --cam given) or the device."""
    without_cam = " or leave out --cam" if cam else ""
    cpu = ", or pass --device cpu" if device.type != "cpu" else ""
    return out_of_memory_as(ReportError(
        f"out of memory classifying the pictures on {device.type}; try fewer pictures at a "
        f"time{without_cam}{cpu}."))


@contextmanager
def cam_folder(classifier: Classifier, layer: str, out: Path | None) -> Iterator[None]:
    """With --cam (`out`; None: without), for the block: refuse a --layer without a feature
    map and make the folder before any work (a CAM of fc would fail only after predicting, a
    bad --cam after an hour of it). The folders made here are removed when the block fails
    or writes nothing into them (no picture was readable): a run that makes no overlay leaves
    no folder."""
    if out is None:
        yield
        return
    layer_of(classifier.model, layer, "--layer")
    made = missing_folders(out)
    with output_dir(out, "--cam"):
        yield
    remove_empty(made)  # it and the folders made above it, where no overlay was written


@dataclass
class Pictures:
    """The picture files given, and what reading them gave."""

    files: list[Path]  # each file as given, each folder's pictures sorted by name
    readable: list[Path]
    images: np.ndarray  # the readable ones as uint8 N x 32 x 32 x 3
    errors: dict[Path, str]  # an error message per other file


def read_pictures(paths: list[Path]) -> Pictures:
    """The picture files and folders `paths` name, read; DataError when they hold none."""
    files = expand(paths)
    if not files:
        inside = sorted(d for p in paths if p.is_dir() for d in p.iterdir() if d.is_dir())
        unread = (f", not its sub-folders (pass those: {' '.join(map(str, inside[:3]))}"
                  f"{' ...' if len(inside) > 3 else ''})" if inside else "")
        raise DataError(f"no image files in {', '.join(map(str, paths))}; a folder's pictures "
                        f"are its files named {' '.join(sorted(SUFFIXES))} (in any case){unread}; "
                        "pass a picture with another suffix by its file name.")
    return Pictures(files, *read_all(files))


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


def classify(classifier: Classifier, images: np.ndarray) -> torch.Tensor:
    """Softmax probabilities (N x C, on the CPU) of uint8 N x 32 x 32 x 3 pictures, with a
    progress bar from PROGRESS_FROM pictures."""
    with progress_bar(len(images), "classifying", "image",
                      enabled=len(images) >= PROGRESS_FROM) as bar:
        return probabilities(classifier.model, classifier.to_input, images, bar.update)


def top_classes(classifier: Classifier, pictures: Pictures,
                k: int) -> tuple[list[dict], np.ndarray]:
    """A row per file, {file, predictions: [{class, probability}] of its top k classes} or
    {file, error}; and the predicted class of each readable picture."""
    if not pictures.readable:  # nothing to classify: every file is an error row
        return file_rows(pictures, {}), np.zeros(0, np.int64)
    probs = classify(classifier, pictures.images)
    if not probs.isfinite().all():
        raise checkpoint.broken_outputs(classifier.path)
    top = probs.topk(min(k, len(classifier.classes)), dim=1)
    found = {path: [{"class": classifier.classes[int(c)], "probability": float(p)}
                    for p, c in zip(top.values[i], top.indices[i], strict=True)]
             for i, path in enumerate(pictures.readable)}
    return file_rows(pictures, found), probs.argmax(1).numpy()


def file_rows(pictures: Pictures, found: dict[Path, list[dict]]) -> list[dict]:
    """A row per file, in the order given: its predictions where `found` holds them, else its
    error."""
    return [{"file": str(path), "predictions": found[path]} if path in found
            else {"file": str(path), "error": pictures.errors[path]} for path in pictures.files]


CAM_SUFFIX = ".cam.png"  # an overlay's name: its picture's stem, then this
# a stem's bytes in an overlay's name: with "-<n>.cam.png" it stays within the 255 bytes a
# file system's names take, however long the picture's name was (it may be 255 itself)
STEM_BYTES = 255 - len(f"-99999{CAM_SUFFIX}")


def cam_names(files: list[Path]) -> list[str]:
    """One overlay file name per picture: its stem (cut to STEM_BYTES), numbered when two
    pictures share one."""
    names, seen = [], set()
    for path in files:
        stem = path.stem
        while len(os.fsencode(stem)) > STEM_BYTES:
            stem = stem[:-1]
        name, n = f"{stem}{CAM_SUFFIX}", 1
        while name in seen:
            n += 1
            name = f"{stem}-{n}{CAM_SUFFIX}"
        seen.add(name)
        names.append(name)
    return names


def renamed(files: list[Path], names: list[str]) -> list[str]:
    """'<file> as <overlay>' for each picture whose overlay is not <its stem>.cam.png (a
    name two pictures share, numbered; a long one, cut), so each overlay's picture is said."""
    return [f"{escaped(str(path))} as {escaped(name)}"
            for path, name in zip(files, names, strict=True) if name != path.stem + CAM_SUFFIX]


def write_cams(classifier: Classifier, pictures: Pictures, predicted: np.ndarray, layer: str,
               out: Path) -> list[str]:
    """A Grad-CAM overlay PNG per readable picture for its predicted class, as report.py draws
    them, into existing folder `out`; their file names (cam_names). All are made in a hidden
    folder in `out` and moved out of it only once every one is written, so a failed run (a
    full disk) leaves none of them, and an older overlay of the same name as it was."""
    staging = temporary_name(out / "overlays")
    sweep_dead_writers(out / "overlays")  # the hidden folders of runs that were killed
    names = cam_names(pictures.readable)
    try:
        staging.mkdir()
        for start in range(0, len(pictures.images), CAM_BATCH):
            chunk = pictures.images[start:start + CAM_BATCH]
            inputs = classifier.to_input(torch.from_numpy(chunk).to(classifier.to_input.device))
            maps = cams(classifier.model, inputs, predicted[start:start + CAM_BATCH], layer)
            for image, cam, name in zip(chunk, maps, names[start:start + CAM_BATCH], strict=True):
                Image.fromarray(overlay(image, cam)).resize(
                    (32 * CAM_SCALE, 32 * CAM_SCALE), Image.Resampling.NEAREST,
                ).save(staging / name, format="PNG")
        for name in names:  # renames on one disk: they take no space a full disk lacks
            os.replace(staging / name, out / name)
    except OSError as error:
        raise write_failed(error, out, "--cam", "the overlays") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names

"""ckpt.pt and the run directory's files: written atomically, read with weights_only=True.

ckpt.pt holds plain containers and tensors only (never a pickled class), so loading a file
from elsewhere can never run code. Resume state lives in the same file, so the model and
the optimizer it continues from can never disagree.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import nn

from engine.model import build_model
from loaders.files import atomic_write

FORMAT = "cifar10-engine/ckpt"
VERSION = 1
REQUIRED = ("format", "version", "arch", "width", "num_classes", "state_dict", "classes",
            "mean", "std", "config", "history", "data")


class CheckpointError(Exception):
    """A file that is not a readable cifar10-engine checkpoint; the message says why."""


def _gist(error: Exception) -> str:
    """An exception as one short line: library messages can be empty or pages long."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def save(path: Path, checkpoint: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load(path: Path) -> dict:
    """A validated checkpoint dict (tensors on CPU); CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the ckpt.pt of a training run.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, pickles of classes, random bytes, ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({_gist(error)}). It may be truncated or "
            "come from another tool; use the ckpt.pt that engine/train.py wrote.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cifar10-engine checkpoint (no '{FORMAT}' "
                              "marker); use the ckpt.pt that engine/train.py wrote.")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this "
                              f"engine reads version {VERSION}.")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete.")
    return ckpt


def model_from(ckpt: dict, path: Path | str = "checkpoint") -> nn.Module:
    """The trained model rebuilt from a loaded checkpoint: fp32, eager, unwrapped, eval mode."""
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["width"])
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError) as error:  # unknown arch, or weights of another shape
        raise CheckpointError(f"{path}: its weights do not fit a {ckpt['arch']} of width "
                              f"{ckpt['width']} with {ckpt['num_classes']} classes "
                              f"({_gist(error)}).") from None
    return model.eval()


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.csv and metrics.jsonl: one row per epoch, rewritten whole from the history."""
    def write_jsonl(tmp: Path) -> None:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))

    def write_csv(tmp: Path) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(history[0]) if history else [])
        writer.writeheader()
        writer.writerows(history)
        tmp.write_text(buffer.getvalue())

    atomic_write(out / "metrics.jsonl", write_jsonl)
    atomic_write(out / "metrics.csv", write_csv)


def write_json(path: Path, content: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))

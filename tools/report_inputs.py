"""report.py's inputs: the checkpoint, its model on a device, the test split it was trained
against (checked to fit), and the model's predictions on it; export's check finds its test
split here too (locate_test_data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import ReportError, listing
from common.paths import no_file_to_read, not_a_folder
from engine import checkpoint
from engine.config import TrainConfig
from engine.evaluate import probabilities
from loaders import beton
from loaders.preparation import prepare


@dataclass
class TrainedRun:
    """A loaded checkpoint, its model on the device and its test split, checked to fit: the
    finished run a report describes (engine.run.Run is a run in training)."""

    path: Path
    ckpt: dict
    model: nn.Module  # fp32, eager, unwrapped, eval mode
    test: Path  # the test .beton
    images: np.ndarray  # uint8 N x 32 x 32 x 3 (HWC, RGB), in test order
    labels: np.ndarray
    device: torch.device

    @property
    def classes(self) -> list[str]:
        """Class names, indexed by label."""
        return list(self.ckpt["classes"])


def locate_test_data(ckpt: dict, path: Path, data_dir: Path | None) -> Path:
    """The test .beton: the one recorded in the checkpoint, or rebuilt from --data-dir."""
    data = ckpt["data"]  # checkpoint.load made sure it holds each DATA_KEYS entry as text
    dataset = data["dataset"]
    if data_dir is None:
        recorded = Path(data["test"])
        if not recorded.is_file():
            what = no_file_to_read(recorded) or "does not exist (moved or deleted?)"
            raise ReportError(f"{path} records its test data at {recorded}, which {what}. "
                              f"Pass --data-dir DIR, an existing folder, to rebuild the {dataset} "
                              "test split there.")
        return recorded
    if not data_dir.is_dir():
        what = not_a_folder(data_dir) if data_dir.exists() else "does not exist"
        # the recorded split as the way out only where it is still there
        recorded = (f", or leave --data-dir out to use {data['test']}"
                    if Path(data["test"]).is_file() else "")
        raise ReportError(f"--data-dir {data_dir} {what}. Pass the folder the run was "
                          f"trained from (it holds the {dataset} data or its .beton files) or "
                          f"another existing folder to rebuild the test split in{recorded}.")
    # the config says how the data was made (synthetic_size): rebuilt from a damaged one, it
    # would be a guess
    cfg = checkpoint.checked_config(path, ckpt, lambda: TrainConfig(**ckpt["config"]),
                                    fix="Pass the ckpt.pt or best.pt that engine/train.py wrote.")
    return prepare(dataset, data_dir, synthetic_size=cfg.synthetic_size).test


def load(path: Path, data_dir: Path | None, device: torch.device) -> TrainedRun:
    """Checkpoint, model and test split; ReportError (or Checkpoint/DataError) if they misfit."""
    ckpt = checkpoint.load(path)  # its history holds at least one epoch
    model = checkpoint.model_from(ckpt).to(device)
    test = locate_test_data(ckpt, path, data_dir)
    info = beton.check(test, full=True)  # the hash: the file recorded may since have changed
    split = beton.read(test)  # checked in full just above; read compares the size again
    if info.classes != ckpt["classes"] or (
            len(split.labels) and split.labels.max() >= ckpt["num_classes"]):
        raise ReportError(f"{test} holds another dataset than the one {path} was trained on "
                          f"({ckpt['num_classes']} classes: {listing(ckpt['classes'], 4)}); "
                          "pass the right --data-dir.")
    return TrainedRun(path, ckpt, model, test, split.images, split.labels, device)


def in_chunks(work: Callable[[slice], np.ndarray], n: int, size: int) -> np.ndarray:
    """work(part) for consecutive slices of at most `size` of n images, joined in order: a
    pass over n images then needs the memory of `size` of them, whatever n (-n has no upper
    bound)."""
    return np.concatenate([work(slice(start, start + size)) for start in range(0, n, size)])


def predictions(run: TrainedRun) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N x C) and labels of the test split: fp32, eager, no TTA."""
    to_input = checkpoint.model_input(run.ckpt, run.device)
    return probabilities(run.model, to_input, run.images).numpy(), run.labels


def most_confidently_wrong(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n wrong predictions made with the highest probability, highest first."""
    pred, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:n]


def normalized(run: TrainedRun, indices: np.ndarray) -> torch.Tensor:
    """The model's input for these test images."""
    to_input = checkpoint.model_input(run.ckpt, run.device)
    return to_input(torch.from_numpy(run.images[indices]).to(run.device))


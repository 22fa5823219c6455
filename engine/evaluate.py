"""Evaluation: summed loss and accuracy (reduced across processes by the caller), optional flip
test-time augmentation, and per-image predictions for reports."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import eval_mode


def logits_of(model: nn.Module, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class scores, averaged with those of the mirrored image when tta is on (airbench's
    level-1 TTA: CIFAR classes are mirror-symmetric, so both views are evidence)."""
    logits = model(images).float()
    if tta:
        logits = (logits + model(images.flip(3)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, tta: bool = False,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """[loss summed over samples, correct, count] of this process's shard, on the device.

    Sums rather than means, so shards of different sizes reduce exactly: the mean is taken
    once, after the sum over processes, and each sample counts once. `autocast` gives the
    training run's mixed precision (Run.autocast), so batches of its dtype fit the model.
    """
    device = next(model.parameters()).device
    totals, count = torch.zeros(2, device=device), 0
    with eval_mode(model):
        for images, labels in loader:
            with autocast():
                logits = logits_of(model, images, tta)
            totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                   (logits.argmax(1) == labels).sum().float()])
            count += len(labels)  # on the host: a tensor per batch would wait for the device
    # an empty shard still takes part in the reduction, with zeros
    return torch.cat([totals, torch.tensor([float(count)], device=device)])


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, tta: bool = False) -> tuple[torch.Tensor, ...]:
    """Softmax probabilities (N x C) and labels (N) on the CPU, in loader order."""
    probs, labels = [], []
    with eval_mode(model):
        for images, batch_labels in loader:
            probs.append(logits_of(model, images, tta).softmax(1).cpu())
            labels.append(batch_labels.cpu())
    return torch.cat(probs), torch.cat(labels)

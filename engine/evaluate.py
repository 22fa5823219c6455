"""Evaluation: summed loss and accuracy (reduced across processes by the caller), optional flip
test-time augmentation, and per-image probabilities for report and predict."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.model import eval_mode
from loaders.augment import Augment

BATCH = 256  # images per forward pass of probabilities


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


@torch.inference_mode()
def probabilities(model: nn.Module, to_input: Augment, images: np.ndarray,
                  on_batch: Callable[[int], object] = lambda n: None) -> torch.Tensor:
    """Softmax probabilities (N x C, on the CPU) of uint8 N x 32 x 32 x 3 images, BATCH at a
    time, given to `model` (in eval mode) as `to_input` makes them; on_batch(size) after each
    batch (a progress bar)."""
    probs = []
    for start in range(0, len(images), BATCH):
        batch = torch.from_numpy(images[start:start + BATCH]).to(to_input.device)
        probs.append(model(to_input(batch)).float().softmax(1).cpu())
        on_batch(len(batch))
    return torch.cat(probs)

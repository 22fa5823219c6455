"""Training FLOPs per image, counted by torch.utils.flop_counter.FlopCounterMode over a real
forward and backward pass, so MFU rests on what runs rather than on a hand count."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PROBE_IMAGES = 2  # images of the counted batch: FLOPs scale linearly with it


def count_train_flops(model: nn.Module, channels_last: bool = False) -> tuple[int, dict[str, int]]:
    """FLOPs per 3 x 32 x 32 image of one forward + backward (loss included) in training mode,
    in total and per top-level module; counted on a CPU copy so the model's weights, statistics
    and gradients are untouched."""
    probe = copy.deepcopy(model).float().cpu().train()
    x = torch.randn(PROBE_IMAGES, 3, 32, 32)
    if channels_last:
        probe, x = probe.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = probe(x)
        F.cross_entropy(logits, torch.zeros(PROBE_IMAGES, dtype=torch.long)).backward()
    by_module = {name: sum(counts.values()) // PROBE_IMAGES
                 for name, counts in counter.get_flop_counts().items() if name.count(".") == 1}
    return counter.get_total_flops() // PROBE_IMAGES, by_module


def train_flops(model: nn.Module, channels_last: bool = False) -> int:
    """Counted training FLOPs per 3 x 32 x 32 image: the numerator of MFU."""
    return count_train_flops(model, channels_last=channels_last)[0]

"""Batched augmentation on whatever device the batch is on: flip, translate, normalize, cutout.

Flip and translate are one gather over uint8 pixels (a quarter of the bytes of fp32); reflect
or zero padding is done by index arithmetic, so no padded copy is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # random horizontal flip with p=0.5
    translate: int = 2  # random shift by up to this many pixels (pad-and-crop); 0 = off
    reflect: bool = True  # pad by reflection (else with black pixels)
    cutout: int = 0  # side of a square set to the mean colour; 0 = off

    def __post_init__(self):
        if not 0 <= self.translate <= 16 or not 0 <= self.cutout <= 32:
            raise ValueError(f"--translate must be in 0..16 and --cutout in 0..32, got "
                             f"{self.translate} and {self.cutout}")


def epoch_generator(seed: int, epoch: int, device: torch.device | str,
                    stream: int = 0) -> torch.Generator:
    """One generator per (seed, epoch, stream): the same seed gives the same batches.

    Streams keep independent draws apart (0: augmentation, 1: sample order).
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 2 + stream)


def _source_index(index: torch.Tensor, size: int, reflect: bool) -> tuple[torch.Tensor, ...]:
    """Map shifted indices back into 0..size-1 by reflection or clamping; False where padded."""
    inside = (index >= 0) & (index < size)
    if reflect:  # -1 -> 1, size -> size - 2: numpy/torch 'reflect' padding
        index = index.abs()
        index = torch.where(index >= size, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1), inside | reflect


def draw_flip_translate(n: int, cfg: AugmentConfig, g: torch.Generator,
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random (shift, flip) of n images: 2 x n x 1 shifts (rows, cols) and n x 1 flips or None.

    Drawn apart from `gather_flip_translate` so that explicit draws can be applied on any device.
    """
    shift = torch.randint(-cfg.translate, cfg.translate + 1, (2, n, 1), generator=g,
                          device=device)
    flip = torch.rand(n, 1, generator=g, device=device) < 0.5 if cfg.flip else None
    return shift, flip


def gather_flip_translate(images: torch.Tensor, cfg: AugmentConfig, shift: torch.Tensor,
                          flip: torch.Tensor | None) -> torch.Tensor:
    """N x H x W x C images flipped where `flip` and shifted by `shift`, as one gather."""
    n, h, w, _ = images.shape
    dev = images.device
    cols = torch.arange(w, device=dev).expand(n, w)
    if flip is not None:
        cols = torch.where(flip, w - 1 - cols, cols)
    rows, row_ok = _source_index(torch.arange(h, device=dev) + shift[0], h, cfg.reflect)
    cols, col_ok = _source_index(cols + shift[1], w, cfg.reflect)
    out = images[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if not cfg.reflect:
        out = out * (row_ok[:, :, None] & col_ok[:, None, :])[..., None]
    return out


def flip_translate(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random flip and translation of N x H x W x C images, as one gather."""
    shift, flip = draw_flip_translate(len(images), cfg, g, images.device)
    return gather_flip_translate(images, cfg, shift, flip)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred uniformly in each image (DeVries & Taylor, 2017).

    Applied after normalization, so zero is the dataset's mean colour. The square is clipped
    at the borders, as in the paper.
    """
    n, _, h, w = x.shape
    dev = x.device
    top = torch.randint(0, h, (n, 1), generator=g, device=dev) - size // 2
    left = torch.randint(0, w, (n, 1), generator=g, device=dev) - size // 2
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (ys >= top) & (ys < top + size)
    in_cols = (xs >= left) & (xs < left + size)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0)


class Augment:
    """uint8 N x 32 x 32 x 3 batches in, normalized channels_last N x 3 x 32 x 32 out."""

    def __init__(self, cfg: AugmentConfig | None, mean: list[float], std: list[float],
                 dtype: torch.dtype, device: torch.device | str):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        # scale folded into mean/std so normalization is one subtract and one multiply on uint8
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.generator: torch.Generator | None = None

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.generator = epoch_generator(seed, epoch, self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg is not None:
            if self.generator is None:
                raise RuntimeError("call set_epoch(seed, epoch) before augmenting")
            images = flip_translate(images, self.cfg, self.generator)
        # NHWC memory viewed as NCHW is exactly channels_last: no copy needed
        x = images.permute(0, 3, 1, 2).float().sub_(self.mean).mul_(self.inv_std)
        if self.cfg is not None and self.cfg.cutout:
            x = cutout(x, self.cfg.cutout, self.generator)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

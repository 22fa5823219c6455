"""Batched augmentation on whatever device the batch is on: flip, translate, normalize, cutout.

Flip and translate are one gather. Over a uint8 batch (a quarter of the bytes of fp32) it
takes whole pixels by a flat pixel index, and reflect or zero padding is index arithmetic.
Over a split held on the device (the resident loader), normalized once when it was loaded and
padded and mirrored then too, it takes whole output rows: each is a contiguous run of a padded
row, so an epoch's sample order, flips and shifts are one row index, 1/32 the pixel index's
entries, and the gather is the whole per-epoch work.
"""

from __future__ import annotations

import functools

import torch

from loaders.options import AugmentConfig

# Ranks' seeds lie this far apart: even, to keep the stream bit; twice an odd number, so that
# ranks stay distinct in the low 32 bits, all a CPU generator (mt19937) keeps of a seed.
RANK_STRIDE = 2 * 0x9E3779B9


def epoch_generator(seed: int, epoch: int, device: torch.device | str, stream: int = 0,
                    rank: int = 0) -> torch.Generator:
    """One generator per (seed, epoch, stream, rank): the same seed gives the same batches.

    Streams keep independent draws apart (0: augmentation, 1: sample order). Each rank draws
    its own augmentations (the same ones would pair images across a global batch); the sample
    order is one permutation that the ranks split, so it takes rank 0 on every rank.
    """
    mixed = (seed * 1_000_003 + epoch) * 2 + stream
    # the high half folded into the low one, all a CPU generator keeps: seeds 2**31 apart drew
    # the same batches there (the doubling shifts a seed's top bit out of the low half)
    return torch.Generator(device=device).manual_seed(
        (mixed ^ (mixed >> 32)) + rank * RANK_STRIDE)


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


@functools.cache
def _shift_tables(h: int, w: int, cfg: AugmentConfig, device: torch.device
                  ) -> tuple[torch.Tensor, ...]:
    """Source rows (and where they are inside) for each vertical shift, (2T+1) x h, and source
    columns for each (flip, horizontal shift), 2 x (2T+1) x w: made once per size and device,
    so a batch looks its rows and columns up instead of recomputing them."""
    shifts = torch.arange(-cfg.translate, cfg.translate + 1, device=device)[:, None]
    rows, row_ok = _source_index(torch.arange(h, device=device) + shifts, h, cfg.reflect)
    cols = torch.arange(w, device=device)
    by_flip = [_source_index(c + shifts, w, cfg.reflect) for c in (cols, w - 1 - cols)]
    return (rows, row_ok, torch.stack([c for c, _ in by_flip]),
            torch.stack([ok for _, ok in by_flip]))


def gather_flip_translate(images: torch.Tensor, cfg: AugmentConfig, shift: torch.Tensor,
                          flip: torch.Tensor | None) -> torch.Tensor:
    """N x H x W x C images flipped where `flip` and shifted by `shift`, as one gather."""
    n, h, w, c = images.shape
    dev = images.device
    rows, row_ok, cols, col_ok = _shift_tables(h, w, cfg, dev)
    dy, dx = shift[0, :, 0] + cfg.translate, shift[1, :, 0] + cfg.translate
    flipped = flip[:, 0].long() if flip is not None else torch.zeros_like(dx)
    rows, cols = rows[dy], cols[flipped, dx]  # n x h, n x w
    # one flat pixel index per output pixel: index_select copies whole pixels (C values) and
    # measured faster than advanced indexing with three index tensors
    samples = torch.arange(n, device=dev)
    pixel = ((samples[:, None] * h + rows)[:, :, None] * w + cols[:, None, :]).view(-1)
    out = images.reshape(-1, c).index_select(0, pixel).view(n, h, w, c)
    if not cfg.reflect:
        out = out * (row_ok[dy][:, :, None] & col_ok[flipped, dx][:, None, :])[..., None]
    return out


def flip_translate(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random flip and translation of N x H x W x C images, as one gather."""
    shift, flip = draw_flip_translate(images.shape[0], cfg, g, images.device)
    return gather_flip_translate(images, cfg, shift, flip)


def crop_rows(padded: torch.Tensor, cfg: AugmentConfig, shift: torch.Tensor,
              flip: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """Images `index` of a split made by `Augment.store` (copies x N x H' x W' x C: padded by
    cfg.translate, its mirror image second), flipped where `flip` and shifted by `shift`: the
    same pixels as gather_flip_translate, gathered as whole output rows."""
    _, n_all, hp, wp, c = padded.shape
    h, w = hp - 2 * cfg.translate, wp - 2 * cfg.translate
    dy, dx = shift[0, :, 0] + cfg.translate, shift[1, :, 0] + cfg.translate
    if flip is not None:  # the mirror's column x + 2T - dx is column x - T + dx mirrored
        dx = torch.where(flip[:, 0], 2 * cfg.translate - dx, dx)
        index = index + flip[:, 0] * n_all
    rows = (index * hp + dy)[:, None] + torch.arange(h, device=padded.device)  # n x h
    start = (rows * wp + dx[:, None]).view(-1)  # the pixel each output row starts at
    flat = padded.view(-1)
    runs = flat.as_strided((flat.numel() // c - w + 1, w * c), (c, 1))  # every run of w pixels
    return runs.index_select(0, start).view(len(index), h, w, c)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred uniformly in each image (DeVries & Taylor, 2017).

    Applied after normalization, so zero is the dataset's mean colour. The square is clipped
    at the borders, as in the paper's code; its side is `size` for odd sizes too, where the
    paper's code (centre +- size // 2) cuts one pixel less.
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
    """uint8 N x 32 x 32 x 3 batches in (or splits already through `store`), normalized
    N x 3 x 32 x 32 out, channels_last unless asked for contiguous (a --no-channels-last run's
    model)."""

    def __init__(self, cfg: AugmentConfig | None, mean: list[float], std: list[float],
                 dtype: torch.dtype, device: torch.device | str, channels_last: bool = True):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # (x / 255 - mean) / std = x * scale + offset: one fused multiply-add reading uint8
        self.scale = 1 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.offset = -torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255 * self.scale
        self.generator: torch.Generator | None = None

    def set_epoch(self, seed: int, epoch: int, rank: int = 0) -> None:
        self.generator = epoch_generator(seed, epoch, self.device, rank=rank)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        """(x - 255 mean) / (255 std) of uint8 N x H x W x C: fp32 N x C x H x W channels_last."""
        # NHWC memory viewed as NCHW is exactly channels_last: no copy needed; addcmul promotes
        # uint8 to fp32 as it reads, so this is one pass (converting, subtracting and
        # multiplying apart were three, about 1.4x the time on CPU)
        return torch.addcmul(self.offset, images.permute(0, 3, 1, 2), self.scale)

    def _normalized_split(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C normalized in the output dtype, still N x H x W x C."""
        return self._normalized(images).to(self.dtype).permute(0, 2, 3, 1)

    def store(self, images: torch.Tensor) -> torch.Tensor:
        """A whole uint8 N x H x W x C split normalized once, in the output dtype, for
        `__call__` with an index, which then neither converts nor normalizes per epoch. For
        training, padded by cfg.translate (reflect, or black pixels) and, with flips, stacked
        with its mirror image: 1 or 2 x N x H' x W' x C, 2.5x the split's bytes at translate 2,
        so that each epoch is one gather of whole rows (crop_rows). Flip and translate only
        move pixels, so the output is the same as augmenting the uint8 split."""
        split = self._normalized_split(images)
        if self.cfg is None:
            return split
        t, (n, h, w, c) = self.cfg.translate, split.shape
        padded = torch.empty((1 + self.cfg.flip, n, h + 2 * t, w + 2 * t, c),
                             dtype=split.dtype, device=split.device)
        if self.cfg.reflect:
            padded[0] = torch.nn.functional.pad(split.permute(0, 3, 1, 2), (t,) * 4,
                                                mode="reflect").permute(0, 2, 3, 1)
        else:  # zero padding of normalized images: black pixels
            padded[0] = self._normalized_split(
                torch.zeros(1, 1, 1, c, dtype=torch.uint8, device=split.device))
            padded[0, :, t:t + h, t:t + w] = split
        if self.cfg.flip:
            padded[1] = padded[0].flip(2)
        return padded

    def __call__(self, images: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Augment a uint8 batch, or images[index] of a split made by `store`."""
        normalized = images.dtype != torch.uint8
        if normalized and index is None:
            raise ValueError("a split made by store() is augmented by index")
        if self.cfg is not None:
            if self.generator is None:
                raise RuntimeError("call set_epoch(seed, epoch) before augmenting")
            if normalized:
                shift, flip = draw_flip_translate(len(index), self.cfg, self.generator,
                                                  self.device)
                images = crop_rows(images, self.cfg, shift, flip, index)
            else:
                images = flip_translate(images, self.cfg, self.generator)
        elif normalized:
            images = images.index_select(0, index)
        x = images.permute(0, 3, 1, 2) if normalized else self._normalized(images)
        if self.cfg is not None and self.cfg.cutout:
            x = cutout(x, self.cfg.cutout, self.generator)
        return x.to(self.dtype).contiguous(memory_format=self.memory_format)

"""Batched augmentation on crafted images whose pixels say where they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cutout_centres

from loaders.augment import (
    Augment,
    cutout,
    draw_flip_translate,
    epoch_generator,
    flip_translate,
)
from loaders.options import AugmentConfig

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def coordinate_images(n: int) -> np.ndarray:
    """Pixel (y, x) of image i holds (y + 1, x + 1, i % 255 + 1): zero only where padded."""
    y, x = np.mgrid[1:33, 1:33]
    images = np.empty((n, 32, 32, 3), np.uint8)
    images[..., 0], images[..., 1] = y, x
    images[..., 2] = (np.arange(n) % 255 + 1)[:, None, None]
    return images


def padded_crop(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int,
                reflect: bool) -> np.ndarray:
    """The reference: numpy-pad, crop shifted by (dy, dx), then mirror when flip."""
    mode = "reflect" if reflect else "constant"
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    crop = padded[pad + dy:pad + dy + 32, pad + dx:pad + dx + 32]
    return crop[:, ::-1] if flip else crop


def random_images(n: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("translate,reflect", [(0, True), (2, True), (4, False), (16, True),
                                               (16, False)])
def test_flip_translate_gives_each_image_its_drawn_mirrored_numpy_padded_crop(translate, reflect):
    """Each output is its image numpy-padded, cropped at the (row, column) shift drawn for it and
    mirrored where its flip was drawn; the draws reach every shift, rows and columns apart."""
    images = coordinate_images(600)
    cfg = AugmentConfig(flip=True, translate=translate, reflect=reflect)
    out = flip_translate(torch.from_numpy(images), cfg, epoch_generator(0, 0, "cpu")).numpy()
    shift, flip = draw_flip_translate(len(images), cfg, epoch_generator(0, 0, "cpu"), "cpu")
    dys, dxs, flips = shift[0, :, 0].tolist(), shift[1, :, 0].tolist(), flip[:, 0].tolist()
    for image, source, dy, dx, flipped in zip(out, images, dys, dxs, flips, strict=True):
        np.testing.assert_array_equal(image, padded_crop(source, dy, dx, flipped, translate,
                                                         reflect))
    shifts = range(-translate, translate + 1)
    assert set(dys) == set(dxs) == set(shifts) and set(flips) == {False, True}
    # one draw for both would shift every image along the diagonal (1 in 2T + 1 by chance)
    assert (shift[0] == shift[1]).float().mean() < 1 / len(shifts) + 0.1


def test_no_flip_and_no_translate_is_the_identity():
    images = random_images()
    cfg = AugmentConfig(flip=False, translate=0)
    assert torch.equal(flip_translate(images, cfg, epoch_generator(0, 0, "cpu")), images)


@pytest.mark.parametrize("size", [1, 8, 13, 32])
def test_cutout_zeroes_exactly_one_clipped_square(size):
    x = torch.rand(500, 3, 32, 32) + 1  # no zero anywhere before
    cutout_centres(cutout(x.clone(), size, epoch_generator(0, 0, "cpu")), x, size)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_normalization_is_x_over_255_minus_mean_over_std(dtype, tol):
    images = random_images()
    out = Augment(None, MEAN, STD, dtype, "cpu")(images)
    want = (images.numpy().transpose(0, 3, 1, 2) / 255 - np.reshape(MEAN, (3, 1, 1))) \
        / np.reshape(STD, (3, 1, 1))
    np.testing.assert_allclose(out.float().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, AugmentConfig(translate=4, cutout=8)], ids=["plain", "aug"])
def test_output_is_channels_last_in_the_requested_dtype(cfg, dtype):
    augment = Augment(cfg, MEAN, STD, dtype, "cpu")
    augment.set_epoch(0, 0)
    out = augment(random_images())
    assert out.shape == (16, 3, 32, 32) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)


def _augmented(seed: int, epoch: int) -> torch.Tensor:
    augment = Augment(AugmentConfig(translate=4, cutout=8), MEAN, STD, torch.float32, "cpu")
    augment.set_epoch(seed, epoch)
    return augment(random_images(64))


def test_same_seed_and_epoch_same_output_other_epoch_or_seed_differs():
    assert torch.equal(_augmented(1, 0), _augmented(1, 0))
    assert not torch.equal(_augmented(1, 0), _augmented(1, 1))
    assert not torch.equal(_augmented(1, 0), _augmented(2, 0))


def test_augmenting_before_set_epoch_raises():
    with pytest.raises(RuntimeError, match="set_epoch"):
        Augment(AugmentConfig(), MEAN, STD, torch.float32, "cpu")(random_images())


@pytest.mark.parametrize("bad", [{"translate": 17}, {"translate": -1}, {"cutout": 33}])
def test_config_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="--translate must be in 0..16 and --cutout in 0..32"):
        AugmentConfig(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [None, AugmentConfig(), AugmentConfig(reflect=False),
                                 AugmentConfig(translate=4, reflect=False, cutout=8),
                                 AugmentConfig(translate=3, flip=False),
                                 AugmentConfig(translate=0), AugmentConfig(translate=16),
                                 AugmentConfig(translate=16, reflect=False)],
                         ids=["plain", "reflect", "zeros", "zeros-cutout", "no-flip", "flip-only",
                              "reflect-16", "zeros-16"])
def test_normalizing_once_then_gathering_is_exactly_augmenting_uint8(cfg, dtype):
    # the resident loader's path: the split normalized at load, then one gather per chunk
    images, index = random_images(64), torch.randperm(64)[:40]
    reference, stored = (Augment(cfg, MEAN, STD, dtype, "cpu") for _ in range(2))
    reference.set_epoch(3, 1)
    stored.set_epoch(3, 1)
    want = reference(images[index])
    got = stored(stored.store(images), index=index)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)


# --- what the mutation audit found unpinned ---------------------------------------------------


def bright_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images in 200..255: above every 255 * MEAN, so no pixel normalizes to zero."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(200, 256, size=(n, 32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("stored", [False, True], ids=["uint8", "stored"])
def test_augment_with_cutout_zeroes_one_square_of_that_side_per_image(stored):
    """Augment applies its config's cutout after normalizing: each image is the plain normalized
    one except for one square (clipped at the border) set to 0, the mean colour."""
    images = bright_images(300)
    augment = Augment(AugmentConfig(flip=False, translate=0, cutout=8), MEAN, STD,
                      torch.float32, "cpu")
    augment.set_epoch(0, 0)
    if stored:
        out = augment(augment.store(images), index=torch.arange(len(images)))
    else:
        out = augment(images)
    plain = Augment(None, MEAN, STD, torch.float32, "cpu")(images)
    cutout_centres(out, plain, 8)


def test_flip_is_drawn_for_about_half_the_images():
    _, flip = draw_flip_translate(4000, AugmentConfig(), epoch_generator(0, 0, "cpu"), "cpu")
    assert flip.shape == (4000, 1) and flip.dtype == torch.bool
    assert 0.45 <= flip.float().mean().item() <= 0.55


@pytest.mark.parametrize("seed", [0, 1, 12345])
@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_an_epochs_order_stream_is_not_the_next_epochs_augmentation_stream(seed, epoch):
    """Streams of one (seed, epoch) are apart from every other (seed, epoch)'s: epoch e's sample
    order (stream 1) must not replay epoch e + 1's augmentation draws (stream 0)."""

    def draws(e: int, stream: int) -> torch.Tensor:
        return torch.randint(2**62, (4,), generator=epoch_generator(seed, e, "cpu", stream))

    assert not torch.equal(draws(epoch, 1), draws(epoch + 1, 0))
    assert not torch.equal(draws(epoch, 0), draws(epoch, 1))
    assert torch.equal(draws(epoch, 1), draws(epoch, 1))


@pytest.mark.parametrize("stream", [0, 1])
def test_seeds_2_31_apart_draw_apart_on_the_cpu(stream):
    """--seed 5 and --seed 2**31 + 5 trained on the same order and augmentations on the CPU,
    whose generator keeps only the low 32 bits of what seeds it."""

    def draws(seed: int) -> torch.Tensor:
        return torch.randint(2**62, (4,), generator=epoch_generator(seed, 3, "cpu", stream))

    assert not torch.equal(draws(5), draws(5 + 2**31))


@pytest.mark.parametrize("size", [1, 8])
def test_cutout_centres_reach_every_row_and_column_including_the_last(size):
    """The centre is uniform over all 32 rows and columns, the border ones too (a hole centred
    on the last row covers it: for size 1, only that centre does)."""
    x = torch.ones(2000, 1, 32, 32)
    rows, cols = cutout_centres(cutout(x.clone(), size, epoch_generator(0, 0, "cpu")), x, size)
    assert set(rows.tolist()) == set(cols.tolist()) == set(range(32))


@pytest.mark.parametrize("edge", [{"cutout": 32}, {"translate": 16}, {"cutout": 0, "translate": 0}])
def test_config_at_the_edges_of_its_ranges_is_accepted(edge):
    cfg = AugmentConfig(**edge)
    assert (cfg.cutout, cfg.translate) == (edge.get("cutout", 0), edge.get("translate", 2))


def test_cutout_32_runs_and_always_covers_the_centre_pixel():
    augment = Augment(AugmentConfig(cutout=32), MEAN, STD, torch.float32, "cpu")
    augment.set_epoch(0, 0)
    out = augment(bright_images(50))
    hole = (out == 0).all(1)
    assert hole[:, 16, 16].all() or hole[:, 15, 15].all()  # a 32-square reaches the middle


@pytest.mark.parametrize("cfg", [None, AugmentConfig()], ids=["plain", "aug"])
def test_a_stored_split_without_an_index_is_refused(cfg):
    """A split made by store() is already normalized: augmenting it as a uint8 batch would
    normalize it twice, so it must come with an index."""
    augment = Augment(cfg, MEAN, STD, torch.float32, "cpu")
    augment.set_epoch(0, 0)
    with pytest.raises(ValueError, match="store"):
        augment(augment.store(random_images()))


def _cutout_holes(seed: int, epoch: int, rank: int = 0) -> torch.Tensor:
    """N x H x W: where Augment's cutout (its only augmentation here) zeroed whole pixels."""
    augment = Augment(AugmentConfig(flip=False, translate=0, cutout=8), MEAN, STD,
                      torch.float32, "cpu")
    augment.set_epoch(seed, epoch, rank)
    return (augment(bright_images(64)) == 0).all(1)


def test_cutout_squares_follow_the_seed_epoch_and_rank():
    """Cutout draws from the epoch's generator like flip and translate: a fixed one would cut
    the same squares every epoch, on every rank and for every seed."""
    assert torch.equal(_cutout_holes(1, 0), _cutout_holes(1, 0))
    assert not torch.equal(_cutout_holes(1, 0), _cutout_holes(1, 1))
    assert not torch.equal(_cutout_holes(1, 0), _cutout_holes(2, 0))
    assert not torch.equal(_cutout_holes(1, 0), _cutout_holes(1, 0, rank=1))


def test_cutout_rows_and_columns_are_drawn_apart():
    """A square's row and column are independent draws: one draw for both would keep every
    square on the diagonal (they agree about 1 time in 32)."""
    hole = cutout(torch.ones(2000, 1, 32, 32), 1, epoch_generator(0, 0, "cpu"))[:, 0] == 0
    rows, cols = hole.any(2).int().argmax(1), hole.any(1).int().argmax(1)
    assert (rows == cols).float().mean() < 0.1

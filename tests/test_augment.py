"""Batched augmentation on crafted images whose pixels say where they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders.augment import Augment, AugmentConfig, cutout, epoch_generator, flip_translate

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
def test_flip_translate_gives_a_mirrored_numpy_padded_crop(translate, reflect):
    """Each output is a (shift, flip) of the numpy-padded image, and every shift occurs."""
    images = coordinate_images(600)
    cfg = AugmentConfig(flip=True, translate=translate, reflect=reflect)
    out = flip_translate(torch.from_numpy(images), cfg, epoch_generator(0, 0, "cpu")).numpy()
    shifts = range(-translate, translate + 1)
    # crop -> the draws giving it: with large reflect shifts, two draws can give one image
    draws: dict[bytes, list[tuple[int, int, bool]]] = {}
    for dy in shifts:
        for dx in shifts:
            for flip in (False, True):
                crop = padded_crop(images[0], dy, dx, flip, translate, reflect)
                draws.setdefault(crop[..., :2].tobytes(), []).append((dy, dx, flip))
    seen = set()
    for image, source in zip(out, images, strict=True):
        candidates = draws.get(image[..., :2].tobytes())
        assert candidates, "not a flipped, padded crop of its image"
        np.testing.assert_array_equal(
            image, padded_crop(source, *candidates[0], translate, reflect))
        seen.update(candidates)
    dys, dxs, flips = zip(*seen, strict=True)
    assert set(dys) == set(dxs) == set(shifts) and set(flips) == {False, True}


def test_no_flip_and_no_translate_is_the_identity():
    images = random_images()
    cfg = AugmentConfig(flip=False, translate=0)
    assert torch.equal(flip_translate(images, cfg, epoch_generator(0, 0, "cpu")), images)


@pytest.mark.parametrize("size", [1, 8, 13, 32])
def test_cutout_zeroes_exactly_one_clipped_square(size):
    x = torch.rand(500, 3, 32, 32) + 1  # no zero anywhere before
    out = cutout(x.clone(), size, epoch_generator(0, 0, "cpu"))
    hole = out == 0
    assert torch.equal(hole.all(1), hole.any(1))  # every channel of a pixel, or none
    assert torch.equal(out[~hole], x[~hole])  # nothing else changes
    hole = hole[:, 0]
    rows, cols = hole.any(2), hole.any(1)
    assert torch.equal(hole, rows[:, :, None] & cols[:, None, :])  # a rectangle
    for line in (*rows, *cols):
        (inside,) = torch.nonzero(line, as_tuple=True)
        first, last = int(inside[0]), int(inside[-1])
        assert len(inside) == last - first + 1  # contiguous and never empty
        if first > 0 and last < 31:
            assert len(inside) == size
        else:  # clipped at the border: the centre still lies inside the image
            assert size - size // 2 <= len(inside) <= size


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
    with pytest.raises(ValueError):
        AugmentConfig(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [None, AugmentConfig(), AugmentConfig(reflect=False),
                                 AugmentConfig(translate=4, reflect=False, cutout=8),
                                 AugmentConfig(translate=3, flip=False),
                                 AugmentConfig(translate=0)],
                         ids=["plain", "reflect", "zeros", "zeros-cutout", "no-flip", "flip-only"])
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

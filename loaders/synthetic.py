"""A synthetic CIFAR-shaped dataset, made offline and deterministically from a seed.

Each class is a shape drawn in its own hue at a random place over a noisy, smoothly varying
background. The shape's box is returned too (stored under 'boxes', ignored by CIFAR readers)
so tests can check that Grad-CAM looks at the object.
"""

from __future__ import annotations

import numpy as np

from loaders.options import SYNTHETIC_CLASSES

SHAPE_SIZE = 10
CHUNK = 2048  # images whose float32 noise is made at once: 25 MB


def _shape_masks() -> np.ndarray:
    """One SHAPE_SIZE x SHAPE_SIZE boolean mask per class, in SYNTHETIC_CLASSES order."""
    y, x = np.mgrid[0:SHAPE_SIZE, 0:SHAPE_SIZE].astype(np.float32)
    c = (SHAPE_SIZE - 1) / 2
    r = np.hypot(y - c, x - c)
    masks = [
        r <= 4.6,
        (r <= 4.8) & (r >= 2.8),
        (abs(y - c) <= 3.5) & (abs(x - c) <= 3.5),
        (abs(y - c) >= 2.5) | (abs(x - c) >= 2.5),
        (abs(y - c) <= 1.5) | (abs(x - c) <= 1.5),
        (abs(y - x) <= 1) | (abs(y + x - 2 * c) <= 1),
        (y % 4) < 2,
        (x % 4) < 2,
        abs(x - c) <= (y + 1) / 2,
        abs(y - c) + abs(x - c) <= 5,
    ]
    return np.stack(masks)


def _hues(n: int) -> np.ndarray:
    """n evenly spaced, fully saturated RGB colours in 0..255."""
    h = np.arange(n) / n * 6
    channel = lambda k: np.clip(np.abs((h + k) % 6 - 3) - 1, 0, 1)  # noqa: E731
    return np.stack([channel(0), channel(4), channel(2)], axis=1) * 255


def _backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uint8 backgrounds: a random base colour, blocky low-frequency variation, pixel noise.

    The float32 noise is made CHUNK images at a time, so memory is the uint8
    output plus one chunk; drawn in the order one draw of it all takes, it is the same data.
    """
    base = rng.uniform(40, 200, size=(n, 1, 1, 3)).astype(np.float32)
    blocks = 30 * rng.standard_normal((n, 4, 4, 3), dtype=np.float32)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for start in range(0, n, CHUNK):
        part = slice(start, min(n, start + CHUNK))
        chunk = 12 * rng.standard_normal((part.stop - start, 32, 32, 3), dtype=np.float32)
        chunk += base[part] + blocks[part].repeat(8, axis=1).repeat(8, axis=2)
        images[part] = np.clip(chunk, 0, 255).astype(np.uint8)
    return images


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n deterministic CIFAR-shaped images, their labels, and each object's box (y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    rng.shuffle(labels)
    images = _backgrounds(rng, n)
    masks, hues = _shape_masks(), _hues(len(SYNTHETIC_CLASSES))
    corners = rng.integers(0, 32 - SHAPE_SIZE + 1, size=(n, 2))
    brightness = rng.uniform(0.75, 1.0, size=n)
    # a shape's pixels replace the background's, so they take its colour alone, rounded as
    # when it was painted into the float32 image (the data must stay what it always was)
    colours = np.clip((hues[labels] * brightness[:, None]).astype(np.float32), 0, 255)
    colours = colours.astype(np.uint8)
    for i, (label, (y, x)) in enumerate(zip(labels, corners, strict=True)):
        images[i, y:y + SHAPE_SIZE, x:x + SHAPE_SIZE][masks[label]] = colours[i]
    boxes = np.concatenate([corners, corners + SHAPE_SIZE], axis=1)
    return images, labels.astype(np.int64), boxes

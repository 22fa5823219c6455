"""The data options of the commands that read a dataset, and the augmentation config with its
ranges, declared once in plain Python, so a command line is parsed (its --help, a refused
value) before numpy and torch load: seconds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.cli import path_option
from common.errors import DataError
from common.hardware import available_memory
from loaders.layouts import ROW_SIZE

DATASETS = ("cifar10", "cifar100", "synthetic", "folder")
SYNTHETIC_SIZE = (50_000, 10_000)  # training and test images: CIFAR-10's, which it stands in for
SYNTHETIC_CLASSES = ["disc", "ring", "square", "frame", "plus", "cross", "hbars", "vbars",
                     "triangle", "diamond"]  # one shape per class (loaders/synthetic.py)


def seed_problem(seed: int) -> str | None:
    """Why --seed cannot seed the data and the run (numpy's and torch's generators both take
    0..2**32-1), or None."""
    return None if 0 <= seed < 2**32 else f"--seed must be in 0..{2**32 - 1}, got {seed}"


# --data-dir as typed: an empty value must not silently mean the current directory
data_dir_option = path_option("write the data into the current directory (e.g. --data-dir data)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options shared by every command that reads a dataset."""
    # no defaults here: engine.options tells options given from options left out, and
    # TrainConfig (or the caller's set_defaults) holds the defaults named in the help
    parser.add_argument("--dataset", choices=DATASETS,
                        help="cifar10 and cifar100 are downloaded once; synthetic is generated "
                             "offline (default: cifar10)")
    parser.add_argument("--data-dir", type=data_dir_option,
                        help="downloads, extracted batches and .beton files (default: ./data)")
    parser.add_argument("--synthetic-size", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                        help="images per split of --dataset synthetic (default: "
                             f"{' '.join(map(str, SYNTHETIC_SIZE))})")


def synthetic_size_unused(dataset: str) -> str | None:
    """Why --synthetic-size, given, would do nothing with `dataset` (it read as used, and a
    run's config.json kept it), or None for the synthetic dataset."""
    return None if dataset == "synthetic" else (
        f"--synthetic-size is for --dataset synthetic, not {dataset}")


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation a loader applies (loaders.augment does it), range-checked."""

    flip: bool = True  # random horizontal flip with p=0.5
    translate: int = 2  # random shift by up to this many pixels (pad-and-crop); 0 = off
    reflect: bool = True  # pad by reflection (else with black pixels)
    cutout: int = 0  # side of a square set to the mean colour; 0 = off

    def __post_init__(self):
        if not 0 <= self.translate <= 16 or not 0 <= self.cutout <= 32:
            raise ValueError(f"--translate must be in 0..16 and --cutout in 0..32, got "
                             f"{self.translate} and {self.cutout}")


def synthetic_size_problem(n_train: int, n_test: int) -> str | None:
    """Why no synthetic split of these sizes can be made (each class needs a training image),
    or None."""
    if n_train >= len(SYNTHETIC_CLASSES) and n_test >= 1:
        return None
    return (f"the synthetic data needs at least {len(SYNTHETIC_CLASSES)} training images, one "
            "per class, and 1 test image")


def check_synthetic_memory(n_train: int, n_test: int, option: str, given: str) -> None:
    """DataError naming `option` and its `given` values (the command's: tools/bench.py sizes
    the split with --images) when the images would not fit in memory, raised before any is
    made (a failed allocation only says "out of memory", naming no option; one that the
    kernel grants and cannot back is a process killed by the OOM killer)."""
    # the written batches are read back and joined: two copies of the images at the peak
    needed = 2 * (n_train + n_test) * ROW_SIZE
    available = available_memory()
    if needed > available:
        raise DataError(f"{option} {given} needs about {needed / 1e9:.1f} GB of memory (twice "
                        "its images: they are read back once written) but "
                        f"{available / 1e9:.1f} GB is available; choose a smaller {option} or "
                        "free some memory.")

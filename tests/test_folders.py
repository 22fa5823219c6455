"""--dataset folder: an ImageFolder tree (train/<class>/*, test/<class>/*) written by PIL,
converted once into the CIFAR python format and .beton files, then used like CIFAR-10."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from common.errors import DataError
from loaders import beton, cifar, folders, make_loader
from loaders.prepare import prepare

CLASSES = ["cat", "dog", "frog"]


def write_tree(root: Path, per_class: tuple[int, int] = (6, 3), seed: int = 0) -> dict:
    """PNG files of random 32x32 images: {split: (images, labels)} in sorted-file order."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in zip(folders.SPLITS, per_class, strict=True):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
                images.append(pixels)
                labels.append(label)
        made[split] = (np.stack(images), np.array(labels))
    return made


def test_an_image_folder_becomes_betons_with_exactly_its_pixels(tmp_path):
    made = write_tree(tmp_path)
    prepared = prepare("folder", tmp_path, workers=1)
    assert prepared.classes == CLASSES
    for split, path in (("train", prepared.train), ("test", prepared.test)):
        read = beton.read(path)
        np.testing.assert_array_equal(read.images, made[split][0])  # 32x32 PNG: identity
        np.testing.assert_array_equal(read.labels, made[split][1])
    for kind in ("ffcv", "resident", "torchvision"):
        loader = make_loader(kind, prepared.test, train=False, batch_size=4, device="cpu",
                             mean=prepared.mean, std=prepared.std, workers=1)
        assert sum(len(labels) for _, labels in loader) == 9


def test_the_conversion_is_cached_until_a_file_changes(tmp_path):
    write_tree(tmp_path)
    first = prepare("folder", tmp_path, workers=1)
    assert prepare("folder", tmp_path, workers=1) == first
    extra = tmp_path / "train" / "dog" / "new.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra)
    second = prepare("folder", tmp_path, workers=1)
    assert second.source != first.source and len(beton.read(second.train).labels) == 19


def test_unreadable_files_are_all_named(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.png").write_text("not an image")
    (tmp_path / "test" / "frog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as error:
        prepare("folder", tmp_path, workers=1)
    message = str(error.value)
    assert str(tmp_path / "train" / "cat" / "notes.png") in message
    assert not list(tmp_path.glob("*.beton")) and not list(tmp_path.glob("folder-*"))
    (tmp_path / "train" / "cat" / "notes.png").unlink()
    with pytest.raises(DataError, match="empty.jpg: not a readable image"):
        prepare("folder", tmp_path, workers=1)


@pytest.mark.parametrize("damage, words", [
    ("empty class", "no images in this class folder"),
    ("no test split", "test is missing"),
    ("other classes", "hold different classes"),
    ("no classes", "has no class folders"),
])
def test_a_malformed_tree_is_refused_naming_the_folder(tmp_path, damage, words):
    write_tree(tmp_path)
    if damage == "empty class":
        for f in (tmp_path / "test" / "dog").iterdir():
            f.unlink()
    elif damage == "no test split":
        os.rename(tmp_path / "test", tmp_path / "validation")
    elif damage == "other classes":
        os.rename(tmp_path / "test" / "dog", tmp_path / "test" / "wolf")
    else:
        for split in folders.SPLITS:
            for d in (tmp_path / split).iterdir():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
    with pytest.raises(DataError, match=words) as error:
        cifar.load("folder", tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.slow
def test_training_and_report_run_unchanged_on_an_image_folder(tmp_path):
    write_tree(tmp_path / "images", per_class=(40, 10))
    out = tmp_path / "run"
    result = run_script("engine/train.py", "--dataset", "folder", "--data-dir",
                        tmp_path / "images", "--width", "8", "--epochs", "1", "--batch-size",
                        "32", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("tools/report.py", out / "ckpt.pt", "-n", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cat" in (out / "report" / "per_class.csv").read_text()

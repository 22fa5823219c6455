""".beton files: bit-exact round trips through stock FFCV and beton.read, the content cache,
atomic writes under SIGKILL, and refusal of damaged files."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTHETIC_SIZE, dump_pickle
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption

from loaders import beton, cifar
from loaders.cifar import DataError
from loaders.prepare import prepare

CLASSES = [str(i) for i in range(10)]


def read_with_stock_ffcv(path: Path, drain) -> cifar.Split:
    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    batches = drain(loader)
    return cifar.Split(np.concatenate([images for images, _ in batches]),
                       np.concatenate([labels for _, labels in batches]).reshape(-1))


READERS = {"stock ffcv Loader": read_with_stock_ffcv,
           "beton.read": lambda path, drain: beton.read(path)}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("reader", READERS)
def test_every_image_and_label_reads_back_bit_exact(prepared, source, drain, reader, split):
    got = READERS[reader](getattr(prepared, split), drain)
    want = getattr(source, split)
    assert got.images.shape == want.images.shape == (len(want.labels), 32, 32, 3)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)


def test_sidecar_records_size_classes_and_training_stats(prepared, source):
    train, test = beton.read_info(prepared.train), beton.read_info(prepared.test)
    assert (train.num_samples, test.num_samples) == (len(source.train.labels),
                                                     len(source.test.labels))
    assert train.classes == test.classes == prepared.classes == cifar.SYNTHETIC_CLASSES
    pixels = source.train.images.reshape(-1, 3) / 255
    np.testing.assert_allclose(train.mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(train.std, pixels.std(0), rtol=1e-6)
    assert (test.mean, test.std) == (train.mean, train.std) == (prepared.mean, prepared.std)


def _stats(paths) -> list[tuple[int, int]]:
    return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


def test_second_prepare_is_a_cache_hit(prepared):
    files = [prepared.train, prepared.test, beton.sidecar(prepared.train),
             beton.sidecar(prepared.test)]
    before = _stats(files)
    again = prepare("synthetic", prepared.train.parent, synthetic_size=SYNTHETIC_SIZE, workers=1)
    assert again == prepared
    assert _stats(files) == before


def test_changed_source_image_rebuilds_the_beton(cifar10_dir):
    first = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    old_bytes = first.train.read_bytes()
    batch_file = cifar10_dir.folder / "data_batch_1"
    with open(batch_file, "rb") as f:  # our own file: safe to unpickle
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"][0, :100] ^= 0xFF
    dump_pickle(batch_file, batch)

    second = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    assert second.train == first.train and first.train.read_bytes() != old_bytes
    got, want = beton.read(second.train), cifar.load("cifar10", cifar10_dir.data_dir).train
    np.testing.assert_array_equal(got.images, want.images)
    assert not np.array_equal(got.images, cifar10_dir.train.images)
    assert beton.read_info(second.train).source_digest == beton.digest(want)


WRITE_MANY = """
import sys
from pathlib import Path
import numpy as np
from loaders import beton, cifar
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(6000, 32, 32, 3), dtype=np.uint8)
split = cifar.Split(images, np.arange(6000) % 10)
beton.write(Path(sys.argv[1]), split, [str(i) for i in range(10)], workers=1)
"""


def test_writer_killed_midway_leaves_no_file_and_next_write_sweeps(tmp_path):
    path = tmp_path / "killed.beton"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_MANY, str(path)],
                              cwd=Path(__file__).parents[1], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".{path.name}.{writer.pid}.tmp"
    try:
        for _ in range(12_000):  # polls, not a time limit: the writer is killed on sight
            if tmp.exists() or writer.poll() is not None:
                break
            time.sleep(0.01)
        assert tmp.exists(), "the writer never showed its temporary file"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)  # the writer and its pool workers
        writer.wait(timeout=60)
    assert tmp.exists() and not path.exists() and not beton.sidecar(path).exists()

    split = cifar.Split(np.full((20, 32, 32, 3), 7, np.uint8), np.arange(20) % 10)
    beton.write(path, split, CLASSES, workers=1)
    assert list(tmp_path.glob(f".{path.name}.*")) == []
    np.testing.assert_array_equal(beton.read(path).images, split.images)


def _cut(fraction: float):
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return damage


DAMAGE = {
    "empty": _cut(0),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "cut in half": _cut(0.5),
    "last byte cut": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "foreign file": lambda p: shutil.copyfile(beton.sidecar(p), p),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_read_refuses_truncated_or_foreign_file(prepared, tmp_path, damage):
    path = tmp_path / prepared.test.name
    shutil.copyfile(prepared.test, path)
    shutil.copyfile(beton.sidecar(prepared.test), beton.sidecar(path))
    damage(path)
    with pytest.raises(DataError, match=str(path)):
        beton.read(path)

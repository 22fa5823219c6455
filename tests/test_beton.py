""".beton files: bit-exact round trips through stock FFCV and beton.read, the content cache,
atomic writes under SIGKILL, and refusal of damaged files."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CIFAR10_CLASSES,
    ROOT,
    SYNTHETIC_SIZE,
    children,
    dump_pickle,
    file_identities,
    overwrite_middle,
    run_code,
    run_script,
    sidecar_info,
    tmpfs,
    wait_until,
)

import loaders
from common.atomic import write_json
from common.hardware import default_workers
from loaders import beton, cifar
from loaders.cifar import DataError
from loaders.guards import guarded_writer, importing_ffcv
from loaders.options import SYNTHETIC_CLASSES
from loaders.preparation import prepare

with importing_ffcv():  # as the loaders import it (see loaders.guards)
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

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
    train, test = sidecar_info(prepared.train), sidecar_info(prepared.test)
    assert (train.num_samples, test.num_samples) == (len(source.train.labels),
                                                     len(source.test.labels))
    assert train.classes == test.classes == prepared.classes == SYNTHETIC_CLASSES
    pixels = source.train.images.reshape(-1, 3) / 255
    np.testing.assert_allclose(train.mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(train.std, pixels.std(0), rtol=1e-6)
    assert (test.mean, test.std) == (train.mean, train.std) == (prepared.mean, prepared.std)


def test_channel_stats_over_several_chunks_are_the_whole_splits(monkeypatch):
    """Summed over chunks of STATS_CHUNK images (CIFAR-10's 50,000 make six; the suite's
    splits, one): every chunk counts, however they split the images (here 4, 3 and 3, the
    first darker)."""
    monkeypatch.setattr(beton, "STATS_CHUNK", 3)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    images[:4] //= 2
    mean, std = beton.channel_stats(images)
    pixels = images.reshape(-1, 3) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)


def test_a_channel_that_never_varies_gets_the_least_std_not_nan():
    # blue always 0 (the variance formula's rounding made it NaN), red always 77 (a spurious
    # 2e-6, which made one grey level of a test image's red worth about 1,600); green varies
    images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    images[..., 0], images[..., 2] = 77, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in sqrt"
        mean, std = beton.channel_stats(images)
    assert std[0] == std[2] == beton.MIN_STD
    np.testing.assert_allclose(std[1], images[..., 1].std() / 255, rtol=1e-6)
    np.testing.assert_allclose(mean, [77 / 255, images[..., 1].mean() / 255, 0], atol=1e-12)


def test_a_constant_channel_whose_variance_rounds_below_0_gets_the_least_std():
    """In float64, E[x^2] - E[x]^2 of 3/255 everywhere is about -7e-15: unclamped, its square
    root is NaN, and a std of NaN makes every loss NaN; clamped to 0, it gets MIN_STD."""
    images = np.full((1000, 32, 32, 3), 3, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in sqrt"
        mean, std = beton.channel_stats(images)
    assert std == [beton.MIN_STD] * 3
    np.testing.assert_allclose(mean, [3 / 255] * 3, atol=1e-12)


@pytest.mark.parametrize("stats", [
    {"std": [float("nan"), 0.2, 0.2]}, {"std": [0.0, 0.2, 0.2]}, {"std": [1e-9, 0.2, 0.2]},
    {"std": [0.2, 0.2]}, {"mean": [0.5, 0.5, 0.5, 0.5]}, {"std": [0.2, float("inf"), 0.2]},
    {"mean": [0.5, float("nan"), 0.5]}, {"std": 0.2}],
    ids=["NaN", "0", "below MIN_STD", "std of 2 channels", "mean of 4 channels", "infinite std",
         "NaN mean", "a number for a list"])
def test_a_sidecar_whose_stats_cannot_normalize_is_rebuilt(prepared, tmp_path, stats):
    # as a constant channel's sidecar was written before MIN_STD: reusing it made every loss
    # NaN; and stats of other than 3 channels (a sidecar edited by hand) were a traceback
    # building the loader's normalization. An infinite std (every image all 0) or a NaN mean
    # passes the std's floor, and a number where a list belongs has no length: each is
    # rebuilt too, never a traceback
    data_dir = _prepared_copy(prepared, tmp_path)
    path = data_dir / prepared.train.name
    write_json(beton.sidecar(path), asdict(replace(sidecar_info(path), **stats)))
    assert sidecar_info(path) is None
    # said as what it is where the file cannot be rebuilt (its source gone, offline), not
    # as a sidecar "of another release"
    assert beton.sidecar_state(path)[1].startswith("is damaged (its sidecar's normalization "
                                                   "cannot be used: mean ")
    again = prepare("synthetic", data_dir, synthetic_size=SYNTHETIC_SIZE, workers=1)
    assert (again.mean, again.std) == (prepared.mean, prepared.std)
    assert sidecar_info(path).std == prepared.std


def test_second_prepare_is_a_cache_hit(prepared):
    files = [prepared.train, prepared.test, beton.sidecar(prepared.train),
             beton.sidecar(prepared.test)]
    before = file_identities(files)
    again = prepare("synthetic", prepared.train.parent, synthetic_size=SYNTHETIC_SIZE, workers=1)
    assert again == prepared
    assert file_identities(files) == before


def test_a_constant_channels_file_is_read_and_cached_as_written(tmp_path):
    """A channel that never varies is recorded with a std of exactly MIN_STD: that sidecar is
    usable (the floor is reached, not crossed), so the file is read and never rebuilt."""
    path = tmp_path / "constant-blue.beton"
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    images[..., 2] = 0
    split = cifar.Split(images, np.arange(20) % 10)
    info = beton.write(path, split, CLASSES, workers=1)
    assert info.std[2] == beton.MIN_STD and sidecar_info(path) == info
    before = file_identities([path, beton.sidecar(path)])
    assert beton.write(path, split, CLASSES, workers=1) == info
    assert file_identities([path, beton.sidecar(path)]) == before
    np.testing.assert_array_equal(beton.read(path).images, images)


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
    assert sidecar_info(second.train).source_digest == beton.digest(want)


def _rewrite(path: Path, change) -> None:
    """Unpickle one of our own test files, change(content) in place, pickle it back."""
    with open(path, "rb") as f:  # our own file: safe to unpickle
        content = pickle.load(f, encoding="bytes")
    change(content)
    dump_pickle(path, content)


def test_changed_source_labels_alone_rebuild_the_beton(cifar10_dir):
    """The cache key covers the labels: relabelled images (same pixels) must not be served
    with their old labels."""
    first = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    old_digest = sidecar_info(first.train).source_digest
    _rewrite(cifar10_dir.folder / "data_batch_1",
             lambda b: b.update({b"labels": [(x + 1) % 10 for x in b[b"labels"]]}))
    want = cifar.load("cifar10", cifar10_dir.data_dir).train
    assert not np.array_equal(want.labels, cifar10_dir.train.labels)
    np.testing.assert_array_equal(want.images, cifar10_dir.train.images)

    second = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    got = beton.read(second.train)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert sidecar_info(second.train).source_digest == beton.digest(want) != old_digest


def test_renamed_classes_reach_both_sidecars(cifar10_dir):
    prepare("cifar10", cifar10_dir.data_dir, workers=1)
    renamed = [name.upper() for name in CIFAR10_CLASSES]
    _rewrite(cifar10_dir.folder / "batches.meta",
             lambda m: m.update({b"label_names": [n.encode() for n in renamed]}))
    again = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    assert again.classes == renamed
    assert sidecar_info(again.train).classes == sidecar_info(again.test).classes == renamed


def test_a_changed_train_split_renormalizes_the_unchanged_test_split(cifar10_dir):
    """The test .beton records the training split's mean and std, which the model sees it
    with: a new training split must update the test sidecar though its images are the same."""
    first = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    old_test = sidecar_info(first.test)

    def whiten(batch: dict) -> None:  # every pixel of its 3 images (of 12) white
        batch[b"data"][:] = 255

    _rewrite(cifar10_dir.folder / "data_batch_1", whiten)
    second = prepare("cifar10", cifar10_dir.data_dir, workers=1)
    train, test = sidecar_info(second.train), sidecar_info(second.test)
    assert train.mean != old_test.mean and train.std != old_test.std
    assert (test.mean, test.std) == (train.mean, train.std) == (second.mean, second.std)
    assert test.source_digest == old_test.source_digest  # its own images did not change


def test_write_refuses_an_empty_split_and_writes_nothing(tmp_path):
    path = tmp_path / "empty.beton"
    empty = cifar.Split(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))
    with pytest.raises(DataError, match=re.escape(f"{path}: the split it would hold has no "
                                                  "images")):
        beton.write(path, empty, CLASSES, workers=1)
    assert list(tmp_path.iterdir()) == []


# The source stalls on its last row, so a kill always lands mid-write, however late it comes.
WRITE_MANY = """
import sys, time
from pathlib import Path
from multiprocessing import shared_memory
import numpy as np
from loaders import beton, cifar
made = shared_memory.SharedMemory.__init__
def recorded(self, *args, **kwargs):  # the test unlinks it: SIGKILL leaves it in /dev/shm
    made(self, *args, **kwargs)
    Path(sys.argv[2]).write_text(self.name)
shared_memory.SharedMemory.__init__ = recorded
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(6000, 32, 32, 3), dtype=np.uint8)
split = cifar.Split(images, np.arange(6000) % 10)
row = beton._Rows.__getitem__
beton._Rows.__getitem__ = lambda self, i: time.sleep(3600) if i == 5999 else row(self, i)
beton.write(Path(sys.argv[1]), split, [str(i) for i in range(10)], workers=1)
"""


def test_writer_killed_midway_leaves_no_file_and_next_write_sweeps(tmp_path):
    path = tmp_path / "killed.beton"
    shared = tmp_path / "shared-memory-name"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_MANY, str(path), str(shared)],
                              cwd=Path(__file__).parents[1], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".{path.name}.{writer.pid}.tmp"

    def named() -> str:
        """The writer's shared memory block, once it has written the name down."""
        return shared.read_text().lstrip("/") if shared.exists() else ""

    try:
        # polled: the writer (its worker asleep on the last sample) is killed once its
        # temporary file and its shared memory's name are both there
        wait_until(lambda: (tmp.exists() and named()) or writer.poll() is not None, 120,
                   "the writer never showed its temporary file and shared memory's name",
                   interval=0.01)
        assert tmp.exists(), "the writer never showed its temporary file"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)  # the writer and its pool workers
        writer.wait(timeout=60)
        if named():  # its resource tracker died with it: nothing else frees this
            (Path("/dev/shm") / named()).unlink(missing_ok=True)
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


def _vouch_for(path: Path, like: Path) -> None:
    """Give path a sidecar that records its present size and hash (like's info otherwise),
    as if it had been written so: check() then passes, and only read()'s own checks of the
    file's structure can refuse it."""
    info = replace(sidecar_info(like), size=path.stat().st_size,
                   file_digest=beton.file_digest(path))
    write_json(beton.sidecar(path), asdict(info))


def _write_other_images(path: Path, mode: str, size: int, width: int | None = None,
                        label: str = "IntField", last: tuple[int, int] | None = None,
                        label_first: bool = False) -> cifar.Split:
    """A .beton written by stock FFCV, as beton.write does, but of other images: `mode`
    ("raw", "jpg", or "proportion": each image raw or jpeg at random) images of size x size
    pixels (size x width when width is given; the last one's height and width `last` when
    given), and labels in FFCV's field `label`, the fields in the order label, image when
    label_first. Returns the split written (its images a list where they differ in size)."""
    with importing_ffcv():
        import ffcv.fields
        from ffcv.writer import DatasetWriter
    rng = np.random.default_rng(0)
    shape = (20, size, size if width is None else width, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    if last is not None:
        images = [*images[:-1], rng.integers(0, 256, (*last, 3), dtype=np.uint8)]
    split = cifar.Split(images, np.arange(20) % 10)
    writer = guarded_writer(DatasetWriter)
    fields = {"image": ffcv.fields.RGBImageField(write_mode=mode),
              "label": getattr(ffcv.fields, label)()}
    rows = beton._Rows(split)
    if label_first:  # FFCV takes each sample's values in the order of its fields
        fields = {"label": fields["label"], "image": fields["image"]}
        rows = [rows[i][::-1] for i in range(len(rows))]
    np.random.seed(0)  # "proportion" draws each image's mode from numpy's global generator
    writer(str(path), fields, num_workers=1).from_indexed_dataset(rows)
    return split


def _cut_allocation_table(path: Path) -> None:
    """The file cut where its allocation table starts (FFCV writes the table last), as a copy
    made before the writer's last write leaves it."""
    with importing_ffcv():
        from ffcv.types import HeaderType
    data = path.read_bytes()
    path.write_bytes(data[: int(np.frombuffer(data, HeaderType, count=1)[0]["alloc_table_ptr"])])


# FFCV's allocation table (24-byte rows) ends the file
STRUCTURE = {  # case: (damage, words of read()'s refusal)
    "a byte appended": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "is truncated"),
    "last allocation cut": (lambda p: p.write_bytes(p.read_bytes()[:-24]), "is truncated"),
    "last byte cut": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "is truncated"),
    "cut in half": (_cut(0.5), "is not a readable .beton"),
    "emptied": (lambda p: p.write_bytes(b""), "is not a readable .beton"),
    "header cut": (lambda p: p.write_bytes(p.read_bytes()[:20]), "is not a readable .beton"),
    "foreign file": (lambda p: p.write_bytes(b'{"not": "a beton"}' * 100),
                     "is not a readable .beton (file format mismatch"),
    "16x16 raw images": (lambda p: _write_other_images(p, "raw", 16),
                         "does not hold raw 32x32 images"),
    # one side right: each side is checked, not only the height
    "32x16 raw images": (lambda p: _write_other_images(p, "raw", 32, 16),
                         "does not hold raw 32x32 images"),
    "16x32 raw images": (lambda p: _write_other_images(p, "raw", 16, 32),
                         "does not hold raw 32x32 images"),
    "jpeg images": (lambda p: _write_other_images(p, "jpg", 32),
                    "does not hold raw 32x32 images"),
    # a few wrong images among right ones: each is checked, not only whether all are wrong
    "raw and jpeg images mixed": (lambda p: _write_other_images(p, "proportion", 32),
                                  "does not hold raw 32x32 images"),
    "one 16x32 raw image": (lambda p: _write_other_images(p, "raw", 32, last=(16, 32)),
                            "does not hold raw 32x32 images"),
    "one 32x16 raw image": (lambda p: _write_other_images(p, "raw", 32, last=(32, 16)),
                            "does not hold raw 32x32 images"),
    # no allocation at all: the table starts at the end, not past it
    "whole allocation table cut": (_cut_allocation_table, "is truncated"),
    # read with numpy, each field's layout is the reader's: another type's is refused
    "float labels": (lambda p: _write_other_images(p, "raw", 32, label="FloatField"),
                     "is not a readable .beton (its fields and their FFCV type ids are "
                     "{'image': 2, 'label': 0}, where ours are {'image': 2, 'label': 1})"),
}


def test_reading_a_beton_imports_neither_ffcv_nor_numba(prepared):
    """beton.read parses the layout with numpy: FFCV's import (numba, opencv, its own) took
    seconds of the start of every command that reads images without FFCV's Loader."""
    code = ("import sys; from pathlib import Path; from loaders import beton\n"
            "split = beton.read(Path(sys.argv[1]))\n"
            "print(len(split.labels), sorted({'ffcv', 'numba', 'cv2'} & set(sys.modules)))")
    result = run_code(code, prepared.test)
    assert result.stdout == f"{SYNTHETIC_SIZE[1]} []\n", result.stderr[-3000:]


@pytest.mark.parametrize("case", STRUCTURE)
def test_read_checks_the_structure_of_a_file_its_sidecar_vouches_for(prepared, tmp_path, case):
    """A sidecar rewritten to match the damaged file (as a copy made mid-write, or another
    tool, could leave it): check()'s size comparison passes, so read() itself must refuse."""
    damage, words = STRUCTURE[case]
    path = tmp_path / prepared.test.name
    shutil.copyfile(prepared.test, path)
    damage(path)
    _vouch_for(path, prepared.test)
    assert beton.check(path)  # the sidecar alone would let it through
    with pytest.raises(DataError, match=re.escape(f"{path} {words}")) as refused:
        beton.read(path)
    assert str(refused.value).endswith("; delete it to rebuild it."), refused.value  # the fix


def test_read_takes_the_fields_in_the_files_order(prepared, tmp_path):
    """FFCV lays each metadata row out in the order of the writer's fields: a file written
    label first (by another tool) must read back as written, not with image and label mixed."""
    path = tmp_path / "label-first.beton"
    split = _write_other_images(path, "raw", 32, label_first=True)
    _vouch_for(path, prepared.test)
    got = beton.read(path)
    np.testing.assert_array_equal(got.images, split.images)
    np.testing.assert_array_equal(got.labels, split.labels)


def test_read_returns_arrays_of_its_own_not_views_of_the_file(prepared, tmp_path):
    """A view of the memory map is read-only and changes when the file does (rewritten in
    place): read's images and labels must be the caller's to keep and to change."""
    path = tmp_path / prepared.test.name
    shutil.copyfile(prepared.test, path)
    shutil.copyfile(beton.sidecar(prepared.test), beton.sidecar(path))
    got = beton.read(path)
    want = (got.images.copy(), got.labels.copy())
    with open(path, "r+b") as f:  # every byte zeroed, in place
        f.write(bytes(path.stat().st_size))
    np.testing.assert_array_equal(got.images, want[0])
    np.testing.assert_array_equal(got.labels, want[1])
    assert got.images.flags.writeable and got.labels.flags.writeable


def test_read_finds_images_stored_past_4_gib(prepared, source, tmp_path):
    """FFCV's pointers are 64-bit: a file over 4 GiB (1.4 million 32x32 images) keeps its
    later images past 4 GiB. Here the prepared file, its samples moved 4 GiB on (a hole)."""
    with importing_ffcv():  # FFCV's own layout, not the reader's
        from ffcv.fields import IntField, RGBImageField
        from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_metadata_type
    data = bytearray(prepared.test.read_bytes())
    header = np.frombuffer(data, HeaderType, count=1)  # views of data: changed in place
    rows = np.frombuffer(data, get_metadata_type([RGBImageField(), IntField()]),
                         count=int(header[0]["num_samples"]), offset=HeaderType.itemsize
                         + int(header[0]["num_fields"]) * FieldDescType.itemsize)
    table = np.frombuffer(data, ALLOC_TABLE_TYPE, offset=int(header[0]["alloc_table_ptr"]))
    start, shift = int(rows["f0"]["data_ptr"].min()), 4 << 30  # all from the first sample on
    rows["f0"]["data_ptr"] += shift
    table["ptr"] += shift
    header["alloc_table_ptr"] += shift
    path = tmp_path / prepared.test.name
    with open(path, "wb") as f:
        f.write(data[:start])
        f.seek(start + shift)  # sparse: no disk space for the hole
        f.write(data[start:])
    # its size recorded (check() compares no more), not its hash: that would read 4 GiB
    write_json(beton.sidecar(path), asdict(replace(sidecar_info(prepared.test),
                                                   size=path.stat().st_size)))
    try:
        got = beton.read(path)
    finally:
        path.unlink()
    np.testing.assert_array_equal(got.images, source.test.images)
    np.testing.assert_array_equal(got.labels, source.test.labels)


# --- damaged files: the sidecar records size and hash ----------------------------------------

DAMAGED = {
    "cut by a few bytes": lambda p: p.write_bytes(p.read_bytes()[:-3]),
    "middle bytes overwritten": overwrite_middle,
    "header cut": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "sidecar cut": lambda p: beton.sidecar(p).write_text(beton.sidecar(p).read_text()[:30]),
}


def _prepared_copy(prepared, tmp_path) -> Path:
    """A data dir holding a copy of the prepared synthetic source and .beton files."""
    data_dir = tmp_path / "data"
    shutil.copytree(prepared.train.parent, data_dir)
    return data_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_prepare_rebuilds_a_damaged_beton_from_its_source(prepared, source, tmp_path, damage):
    data_dir = _prepared_copy(prepared, tmp_path)
    path = data_dir / prepared.train.name
    damage(path)
    result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--data-dir", data_dir,
                        "--synthetic-size", *SYNTHETIC_SIZE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"notice: {path} is damaged" in result.stderr and "Traceback" not in result.stderr
    got = beton.read(path)
    np.testing.assert_array_equal(got.images, source.train.images)
    np.testing.assert_array_equal(got.labels, source.train.labels)
    info = sidecar_info(path)
    assert (info.size, info.file_digest) == (path.stat().st_size, beton.file_digest(path))


def test_cache_hit_checks_the_content_hash(prepared, tmp_path):
    data_dir = _prepared_copy(prepared, tmp_path)
    path = data_dir / prepared.test.name
    overwrite_middle(path)  # same size: only the hash can tell
    assert beton.damage(path, sidecar_info(path), full=False) is None
    assert "hash" in beton.damage(path, sidecar_info(path))
    prepare("synthetic", data_dir, synthetic_size=SYNTHETIC_SIZE, workers=1)
    assert beton.damage(path, sidecar_info(path)) is None


def _older_sidecar(path: Path) -> None:
    """The sidecar of path as an older release wrote it: another FORMAT, all else alike."""
    write_json(beton.sidecar(path), asdict(replace(sidecar_info(path), format=beton.FORMAT - 1)))


def test_a_sidecar_of_another_format_is_rebuilt_never_trusted(prepared, tmp_path):
    data_dir = _prepared_copy(prepared, tmp_path)
    path = data_dir / prepared.train.name
    _older_sidecar(path)
    assert sidecar_info(path) is None
    with pytest.raises(DataError, match=r"is damaged \(its sidecar is of another release\)"):
        beton.check(path)
    again = prepare("synthetic", data_dir, synthetic_size=SYNTHETIC_SIZE, workers=1)
    assert again == replace(prepared, train=path, test=data_dir / prepared.test.name,
                            source=again.source)
    assert sidecar_info(path).format == beton.FORMAT


@pytest.mark.parametrize("kind", ["ffcv", "resident", "torchvision"])
@pytest.mark.parametrize("damage", [DAMAGED["cut by a few bytes"], DAMAGED["header cut"],
                                    lambda p: beton.sidecar(p).unlink(), _older_sidecar],
                         ids=["cut by a few bytes", "header cut", "no sidecar", "older sidecar"])
def test_loaders_refuse_a_damaged_beton_naming_it(prepared, tmp_path, kind, damage):
    path = tmp_path / prepared.test.name
    shutil.copyfile(prepared.test, path)
    shutil.copyfile(beton.sidecar(prepared.test), beton.sidecar(path))
    damage(path)
    with pytest.raises(DataError, match=str(path)) as refused:
        loaders.make_loader(kind, path, train=False, batch_size=8, device="cpu",
                            mean=prepared.mean, std=prepared.std)
    # the command that makes this very file again, not prepare's defaults (CIFAR-10 in data/)
    n_train, n_test = SYNTHETIC_SIZE
    assert f"; run `python loaders/prepare.py --dataset synthetic --synthetic-size {n_train} " \
        f"{n_test} --data-dir {tmp_path}` (or training) to rebuild it" in str(refused.value)


@pytest.mark.parametrize("name, options", [
    ("cifar100-test.beton", "--dataset cifar100"),
    ("folder-0123456789abcdef-train.beton", "--dataset folder"),
    ("synthetic-50000-10000-seed0-train.beton", "--dataset synthetic --synthetic-size 50000 10000"),
    ("mine.beton", None), ("folder-x-train.beton", None), ("cifar10-old.beton", None),
    ("cifar10-test.beton.orig", None), ("synthetic-50000-10000-seed01-train.beton", None)])
def test_a_betons_rebuild_command_is_that_of_the_data_its_name_says(name, options):
    """Named as preparation.beton_paths names them; a file renamed by hand is left to the run's
    own options, a name that only begins as ours too (a copy kept as .orig, a synthetic tag
    with more after it: its command would rebuild another file). The folder is quoted for the
    shell."""
    advice = beton.rebuild_advice(Path("/data/my runs") / name)
    assert advice == (f"run `python loaders/prepare.py {options} --data-dir '/data/my runs'` (or "
                      "training) to rebuild it" if options else
                      "run `python loaders/prepare.py` with the run's --dataset and --data-dir "
                      "(or training) to rebuild it")


def test_a_beton_without_its_sidecar_is_named_so_with_the_command_that_rebuilds_it(prepared,
                                                                                  tmp_path):
    """A .beton copied without its sidecar (FFCV users copy the .beton alone): the reader's
    error names the sidecar it lacks, not a file 'missing' that is there."""
    path = tmp_path / prepared.test.name
    shutil.copyfile(prepared.test, path)
    with pytest.raises(DataError) as refused:
        beton.check(path)
    n_train, n_test = SYNTHETIC_SIZE
    assert str(refused.value) == (
        f"{path} has no sidecar {path.name}.json; run `python loaders/prepare.py --dataset "
        f"synthetic --synthetic-size {n_train} {n_test} --data-dir {tmp_path}` (or training) to "
        "rebuild it.")


def test_prepare_names_its_files_as_the_docs_and_earlier_releases_do(prepared):
    """The names are what FFCV users copy and what a later release looks for: <tag>-<split>.beton,
    its sidecar <name>.beton.json beside it (a sidecar named otherwise would leave every
    prepared folder's files unused, all converted again), the synthetic folder's tag
    synthetic-<train>-<test>-seed0."""
    tag = "synthetic-{}-{}-seed0".format(*SYNTHETIC_SIZE)
    names = {p.name for p in prepared.train.parent.iterdir()}
    assert {tag, f"{tag}-train.beton", f"{tag}-test.beton", f"{tag}-train.beton.json",
            f"{tag}-test.beton.json"} <= names
    assert (prepared.train.name, prepared.test.name) == (f"{tag}-train.beton", f"{tag}-test.beton")


# --- writer failures end in a DataError within seconds, leaving nothing -------------------------

def test_betons_of_one_or_more_writer_workers_read_back_exact_in_the_space_needed(tmp_path):
    """Within space_needed's bound; and exact where several workers wrote (a run's default,
    one a core): each lays out its chunks of 1000 images as it goes, so an image's bytes need
    not follow the one before (the prepared files, of one worker, all do)."""
    rng = np.random.default_rng(0)
    for n, workers in [(1, 1), (1500, 1), (1500, 2), (5000, 2)]:
        path = tmp_path / f"n{n}-w{workers}.beton"
        split = cifar.Split(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), np.arange(n) % 10)
        size = beton.write(path, split, CLASSES, workers=workers).size
        assert size <= beton.space_needed(n, workers), (n, workers)
        got = beton.read(path)
        np.testing.assert_array_equal(got.images, split.images)
        np.testing.assert_array_equal(got.labels, split.labels)


def test_check_space_names_the_folder_and_both_sizes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    beton.check_space(tmp_path, free // 2)
    with pytest.raises(DataError, match=f"{tmp_path} has .* MB free but .* needs"):
        beton.check_space(tmp_path, free + 10**9)


def _leftovers(data_dir: Path) -> list[str]:
    """Temporary files, staging folders and sidecar-less .beton files a failure left."""
    hidden = [p.name for p in data_dir.rglob(".*")]
    orphans = [p.name for p in data_dir.glob("*.beton") if not beton.sidecar(p).exists()]
    return hidden + orphans


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root: skipped otherwise), unmounted after the test."""
    with tmpfs(tmp_path / "disk", "size=4m") as mount:
        yield mount


@pytest.mark.slow
def test_prepare_on_a_full_disk_says_how_much_space_is_missing(small_disk):
    result = run_script("loaders/prepare.py", "--dataset", "synthetic", "--data-dir", small_disk,
                        "--synthetic-size", 256, 64, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {small_disk} has ") and "MB free" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert _leftovers(small_disk) == [] and not list(small_disk.glob("*.beton"))


@pytest.fixture
def writers(monkeypatch) -> list[int]:
    """The worker count each beton.write call of the test is given, in order; the real writer
    writes."""
    real, asked = beton.write, []

    def write(*args, **kwargs):  # the real writer, its worker count noted
        asked.append(kwargs.get("workers", args[4] if len(args) > 4 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(beton, "write", write)
    return asked


def test_writer_workers_beyond_the_cores_are_the_cores(tmp_path, writers):
    """--workers 100000 asked for a page of disk per writer (800 GB), and as many processes."""
    prepared = prepare("synthetic", tmp_path, synthetic_size=(64, 16), workers=100_000)
    assert sidecar_info(prepared.train).num_samples == 64
    assert writers == [default_workers()] * 2


def prepare_with_files_up_to(limit: int, data_dir: Path, train_images: int
                             ) -> subprocess.CompletedProcess:
    """prepare.py making a synthetic set, its files allowed `limit` bytes at most (past it
    Python gets EFBIG, as from a full disk)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "loaders/prepare.py"), "--dataset", "synthetic",
         "--data-dir", str(data_dir), "--synthetic-size", str(train_images), "64"], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


@pytest.mark.slow
def test_writer_worker_failing_ends_in_one_error_without_leftovers(tmp_path):
    data_dir = tmp_path / "data"
    result = prepare_with_files_up_to(12 << 20, data_dir, 3000)  # the source fits, not the .beton
    assert result.returncode == 1
    train = data_dir / "synthetic-3000-64-seed0-train.beton"
    assert result.stderr.startswith(f"error: Writing {train} failed: a worker failed (")
    assert ".tmp" not in result.stderr  # the temporary's name means nothing to the user
    assert "File too large" in result.stderr and "Nothing was kept" in result.stderr
    # the limit, not the disk (which said 'free space in DIR or fix the cause')
    assert result.stderr.endswith("Nothing was kept; raise this process's file size limit "
                                  "(`ulimit -f unlimited`), then run again.\n")
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr
    assert _leftovers(data_dir) == [] and not list(data_dir.glob("*.beton"))


def test_a_file_size_limit_hit_by_the_writers_own_last_write_is_named_as_the_fix(tmp_path):
    """The .beton's tables, which the writing process adds after its workers' images, past
    `ulimit -f` by a byte: an OSError of its own (EFBIG), not a worker's message, said 'free
    space in DIR or fix the cause' on a disk with room to spare."""
    whole = prepare("synthetic", tmp_path / "whole", synthetic_size=(300, 64))
    data_dir = tmp_path / "data"
    result = prepare_with_files_up_to(whole.train.stat().st_size - 1, data_dir, 300)
    assert result.returncode == 1
    train = data_dir / "synthetic-300-64-seed0-train.beton"
    assert result.stderr == (f"error: Writing {train} failed: File too large. Nothing was kept; "
                             "raise this process's file size limit (`ulimit -f unlimited`), "
                             "then run again.\n")
    assert _leftovers(data_dir) == [] and not list(data_dir.glob("*.beton"))


@pytest.mark.slow
def test_a_file_size_limit_hit_writing_the_source_folder_names_it(tmp_path):
    """EFBIG (as ENOSPC) names no file: the command said 'cannot use: File too large'."""
    data_dir = tmp_path / "data"
    result = prepare_with_files_up_to(64, data_dir, 300)
    assert result.returncode == 1
    assert result.stderr == (f"error: Writing {data_dir / 'synthetic-300-64-seed0'} failed (File "
                             f"too large); it needs about 1.1 MB in {data_dir}. Nothing was kept; "
                             "raise this process's file size limit (`ulimit -f unlimited`).\n")
    assert not data_dir.exists()  # made for the data, removed again: it was left empty


# The resource tracker is started first, so no fork of it (the same command line until it
# execs) passes for a worker. A leak is the writer's own shared memory (its name recorded by
# WRITE_MANY) still in /dev/shm: a diff of the whole folder also caught segments that tests in
# other processes made meanwhile (a flaky failure under pytest -n 2).
WRITE_AND_REPORT = WRITE_MANY.replace("beton.write(", """import os
from multiprocessing import resource_tracker
resource_tracker.ensure_running()
try:
    beton.write(""") + """
except cifar.DataError as error:
    print(error)
    made = Path(sys.argv[2]).read_text().lstrip('/')
    print("leaked:", [made] if os.path.exists(f'/dev/shm/{made}') else [])
"""


def _forked_workers(pid: int) -> list[int]:
    """The children of pid forked from it without exec (same command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [child for child, its in children(pid) if its == cmdline]


@pytest.mark.parametrize("workers", [1, 2])
def test_writer_worker_killed_ends_in_a_data_error_within_seconds(tmp_path, workers):
    """With 2 workers, both stuck on a sample, the one not killed goes too: it was left to
    run on after the command had ended (here for an hour), ignoring Ctrl-C as workers do."""
    path = tmp_path / "dead-worker.beton"
    script = WRITE_AND_REPORT.replace("i == 5999", "i >= 3000").replace(
        "workers=1", f"workers={workers}")
    writer = subprocess.Popen([sys.executable, "-c", script, str(path),
                               str(tmp_path.parent / f"{tmp_path.name}-shared-memory")], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / f".{path.name}.{writer.pid}.tmp"

    def all_started() -> list[int]:
        found = _forked_workers(writer.pid) if tmp.exists() else []
        return found if len(found) == workers else []

    try:
        started = wait_until(all_started, 120,  # polled: a worker is killed on sight
                             "the writer never started its workers", process=writer,
                             interval=0.01)
        os.kill(started[-1], signal.SIGKILL)
        out, err = writer.communicate(timeout=30)  # a hang fails here
        left = [w for w in started[:-1] if Path(f"/proc/{w}").exists()
                and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the writer, or a worker it left
            os.killpg(writer.pid, signal.SIGKILL)
    assert left == []
    assert writer.returncode == 0, err
    assert "a worker failed (killed by SIGKILL)" in out and "Nothing was kept" in out
    assert "leaked: []" in out and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# Writer workers that stop without a complete report of their page allocations. Half a report
# leaves a message header and part of a body in the pipe, which a queue the parent also writes
# to never ends; no report at all is a worker that returned early.
STOP_BEFORE_REPORTING = """
import os, signal, struct, sys
from loaders import cifar
from loaders.guards import guarded_writer, importing_ffcv
with importing_ffcv():
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

# FFCV's worker arguments, as guarded_writer passes them
def report_half_and_die(work, metadata, metadata_type, fields, allocator, done, sender, *data):
    # the header of a 1 MB message, then 4 bytes of it
    os.write(sender.connection.fileno(), struct.pack("!i", 1 << 20) + b"half")
    os.kill(os.getpid(), signal.SIGKILL)

def return_early(*args):
    pass

writer = guarded_writer(DatasetWriter)(sys.argv[1], {"label": IntField()}, num_workers=1)
try:
    writer._write_common(4, [[(i, i) for i in range(4)]], globals()[sys.argv[2]], ())
except cifar.DataError as error:
    print(error)
"""


@pytest.mark.parametrize("worker, reason", [
    ("report_half_and_die", "killed by SIGKILL"),
    ("return_early", "it ended without reporting its allocations")])
def test_writer_worker_stopping_before_its_report_ends_in_a_data_error(tmp_path, worker, reason):
    path = tmp_path / "half.beton"
    result = subprocess.run([sys.executable, "-c", STOP_BEFORE_REPORTING, str(path), worker],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # hang: fails
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"a worker failed ({reason})\n"


@pytest.mark.slow
@pytest.mark.parametrize("during", ["generating", "writing"])
@pytest.mark.parametrize("stop", ["ctrl-c", "timeout"])
def test_ctrl_c_in_prepare_prints_one_line_and_leaves_nothing(tmp_path, during, stop):
    """Ctrl-C reaches the whole group; GNU timeout sends SIGTERM to the process, then to its
    group: the writer's workers must not die first and read as a failed write. Writing is
    stopped in 20,000 + 4,000 images, not the default 60,000, which take seconds more to
    generate first: on 2 cores the training .beton is written for 0.5 s (0.9 s at the
    default size), most of it the workers' start, and the stop comes 0.05 s into it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pattern = ".synthetic-*" if during == "generating" else ".*.beton.*.tmp"
    size = ["--synthetic-size", "20000", "4000"] if during == "writing" else []
    prep = subprocess.Popen([sys.executable, str(ROOT / "loaders/prepare.py"), "--dataset",
                             "synthetic", *size, "--data-dir", str(data_dir)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list(data_dir.glob(pattern)) or prep.poll() is not None, 300,
                   f"prepare never reached {during}", interval=0.01)
        assert list(data_dir.glob(pattern)), f"prepare never reached {during}"
        time.sleep(0.05)
        if stop == "ctrl-c":
            os.killpg(prep.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole group
        else:
            os.kill(prep.pid, signal.SIGTERM)
            os.killpg(prep.pid, signal.SIGTERM)
        out, err = prep.communicate(timeout=60)
    finally:
        if prep.poll() is None:
            os.killpg(prep.pid, signal.SIGKILL)
    assert prep.returncode == (130 if stop == "ctrl-c" else 143), err
    assert err.strip() == "interrupted", err
    assert _leftovers(data_dir) == [] and not list(data_dir.glob("*.beton"))
    if during == "generating":
        assert list(data_dir.iterdir()) == []


def test_a_runs_data_is_written_by_no_more_workers_than_its_workers_option(tmp_path, writers):
    """engine.run.prepare_data (build's, the bench's) converts with the config's --workers:
    `--workers 1` on a shared machine wrote the .beton files with every core's worker."""
    from engine.config import TrainConfig
    from engine.run import prepare_data

    prepare_data(TrainConfig(dataset="synthetic", data_dir=str(tmp_path),
                             synthetic_size=(100, 20), workers=1))
    assert writers == [1, 1]

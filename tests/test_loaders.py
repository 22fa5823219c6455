"""The three loaders on the prepared synthetic .beton files (605 train / 201 test), the shared
sharding rule, and the guard that turns a dying FFCV pipeline into an error."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MACHINE_CORES, ROOT, children, cutout_centres, wait_until

import loaders
from common.errors import LoaderError, SetupError
from common.hardware import available_cores, default_workers
from loaders import guards
from loaders.base import BatchLoader
from loaders.options import AugmentConfig
from loaders.sharding import epoch_indices, padding

BATCH = 64
KINDS = loaders.LOADERS
AUGMENT = AugmentConfig(flip=True, translate=2, cutout=8)  # what training batches get


@pytest.fixture(scope="module")
def make(prepared):
    """make(kind, train, seed=0, rank=0, world_size=1, copy=0, augment=AUGMENT,
    channels_last=True): a loader,
    built once per arguments (each FFCV Loader costs a compilation); `copy` asks for another
    instance."""
    built = {}

    def get(kind: str, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
            copy: int = 0, augment: AugmentConfig = AUGMENT,
            channels_last: bool = True) -> loaders.BatchLoader:
        key = (kind, train, seed, rank, world_size, copy, augment, channels_last)
        if key not in built:
            built[key] = loaders.make_loader(
                kind, prepared.train if train else prepared.test, train=train,
                batch_size=BATCH, device="cpu", mean=prepared.mean, std=prepared.std,
                augment=augment, seed=seed, rank=rank, world_size=world_size, workers=1,
                channels_last=channels_last)
        return built[key]

    yield get
    built.clear()


@pytest.fixture
def run_epoch(drain):
    """run_epoch(loader, epoch): the epoch's batches, as (images, labels) copies."""

    def run(loader: loaders.BatchLoader, epoch: int = 0) -> list:
        loader.set_epoch(epoch)
        return drain(loader)

    return run


def labels_of(batches) -> np.ndarray:
    return torch.cat([labels for _, labels in batches]).numpy()


def split_of(source, train: bool):
    return source.train if train else source.test


def indices(n: int, train: bool, epoch: int = 0, rank: int = 0, world_size: int = 1):
    return epoch_indices(n, epoch=epoch, seed=0, shuffle=train, rank=rank,
                         world_size=world_size).numpy()


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("kind", KINDS)
def test_batches_are_channels_last_float_with_int64_labels(make, run_epoch, source, kind,
                                                           train):
    loader = make(kind, train)
    batches = run_epoch(loader)
    assert len(batches) == len(loader)
    sizes = [len(labels) for _, labels in batches]
    assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and 0 < sizes[-1] <= BATCH
    assert sum(sizes) == len(split_of(source, train).labels)
    for images, labels in batches:
        assert images.shape == (len(labels), 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (len(labels),)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_loader_asked_for_contiguous_batches_gives_the_same_images_so(make, run_epoch, kind,
                                                                        train):
    """channels_last=False (a --no-channels-last run's loaders): contiguous batches of the very
    values the channels_last loader gives, the same augmentations included."""
    got = run_epoch(make(kind, train, channels_last=False))
    want = run_epoch(make(kind, train))
    assert len(got) == len(want)
    for (images, labels), (other, other_labels) in zip(got, want, strict=True):
        assert images.is_contiguous() and not images.is_contiguous(
            memory_format=torch.channels_last)
        torch.testing.assert_close(images, other, rtol=0, atol=0)
        assert torch.equal(labels, other_labels)


@pytest.mark.parametrize("kind", KINDS)
def test_test_loader_yields_normalized_source_in_order(make, run_epoch, source, prepared,
                                                       kind):
    batches = run_epoch(make(kind, False))
    np.testing.assert_array_equal(labels_of(batches), source.test.labels)
    images = torch.cat([images for images, _ in batches]).numpy()
    mean, std = (np.reshape(v, (3, 1, 1)) for v in (prepared.mean, prepared.std))
    want = (source.test.images.transpose(0, 3, 1, 2) / 255 - mean) / std
    np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_train_epoch_visits_every_sample_once_in_the_shared_order(make, run_epoch, source,
                                                                  kind):
    labels = labels_of(run_epoch(make(kind, True), epoch=3))
    np.testing.assert_array_equal(np.sort(labels), np.sort(source.train.labels))
    order = indices(len(source.train.labels), True, epoch=3)
    np.testing.assert_array_equal(labels, source.train.labels[order])


@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_changes_the_order_and_replays_it(make, run_epoch, kind):
    loader = make(kind, True)
    first, second, again = (labels_of(run_epoch(loader, e)) for e in (0, 1, 0))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again)


def normalized(images: np.ndarray, prepared) -> np.ndarray:
    """uint8 N x H x W x C images as the loaders normalize them, float64 N x H x W x C."""
    return (images / 255 - np.asarray(prepared.mean)) / np.asarray(prepared.std)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_the_same_batches_whatever_ran_before(make, run_epoch, source,
                                                               prepared, kind):
    """With flip, translate and cutout on (AUGMENT), so the augmentation's draws are compared
    too, not only the order: the batches are checked to be augmented at all."""
    assert AUGMENT.flip and AUGMENT.translate and AUGMENT.cutout
    first = run_epoch(make(kind, True), epoch=2)
    twin = make(kind, True, copy=1)
    run_epoch(twin, epoch=0)  # as an uninterrupted run would have, before a resumed one's epoch
    twin = run_epoch(twin, epoch=2)
    other = run_epoch(make(kind, True, seed=1), epoch=2)
    for (images, labels), (twin_images, twin_labels) in zip(first, twin, strict=True):
        assert torch.equal(images, twin_images) and torch.equal(labels, twin_labels)
    assert not np.array_equal(labels_of(first), labels_of(other))
    # augmented: every image has a cutout hole (whole pixels at 0, the mean colour), so none
    # is its plain normalized source
    images = torch.cat([images for images, _ in first]).numpy().transpose(0, 2, 3, 1)
    plain = normalized(source.train.images[indices(len(source.train.labels), True, 2)],
                       prepared)
    holes = (images == 0).all(-1).sum((1, 2))
    assert (holes >= (AUGMENT.cutout // 2) ** 2).all(), f"{(holes == 0).sum()} without cutout"
    unchanged = np.isclose(images, plain, atol=1e-4).all((1, 2, 3))
    assert not unchanged.any(), f"{unchanged.sum()} images not augmented"


def match_flipped_crops(images: np.ndarray, sources: np.ndarray, pad: int, reflect: bool,
                        prepared) -> tuple[np.ndarray, np.ndarray]:
    """For each normalized N x C x H x W image, the (dy, dx, flip) crop of its uint8 source
    (padded by `pad`, reflecting or black) nearest to it, and how far it is (max abs)."""
    images = images.transpose(0, 2, 3, 1)
    mode = "reflect" if reflect else "constant"
    padded = np.pad(sources, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    padded = normalized(padded, prepared)
    best = np.full(len(images), np.inf)
    draws = np.zeros((len(images), 3), int)
    shifts = range(-pad, pad + 1)
    for dy in shifts:
        for dx in shifts:
            crop = padded[:, pad + dy:pad + dy + 32, pad + dx:pad + dx + 32]
            for flip in (0, 1):
                candidate = crop[:, :, ::-1] if flip else crop
                distance = np.abs(images - candidate).max((1, 2, 3))
                closer = distance < best
                best[closer] = distance[closer]
                draws[closer] = (dy, dx, flip)
    return draws, best


def epoch_draws(batches: list, source, prepared, epoch: int, pad: int, reflect: bool = True,
                rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The (dy, dx, flip) draw of each image of a training epoch's batches on `rank`, after
    checking that they hold the shared order's labels and that each image is such a crop of
    its source."""
    order = indices(len(source.train.labels), True, epoch, rank, world_size)
    np.testing.assert_array_equal(labels_of(batches), source.train.labels[order])
    images = torch.cat([images for images, _ in batches]).numpy()
    draws, distance = match_flipped_crops(images, source.train.images[order], pad, reflect,
                                          prepared)
    assert distance.max() < 1e-4, f"{(distance >= 1e-4).sum()} images are no such crop"
    return draws


@pytest.mark.parametrize("reflect", [True, False], ids=["reflect", "zeros"])
@pytest.mark.parametrize("kind", KINDS)
def test_train_images_are_flipped_shifted_crops_of_their_source(make, run_epoch, source,
                                                                prepared, kind, reflect):
    """Each training image is its source padded (by reflection, or black pixels for
    --pad-mode zeros), cropped at a random shift and flipped about half the time; every shift
    occurs and few images are left as they were."""
    cfg = AugmentConfig(flip=True, translate=2, reflect=reflect, cutout=0)
    batches = run_epoch(make(kind, True, augment=cfg), epoch=1)
    dy, dx, flip = epoch_draws(batches, source, prepared, 1, cfg.translate, reflect).T
    assert 0.4 <= flip.mean() <= 0.6
    assert set(dy) == set(dx) == set(range(-2, 3))
    assert ((dy == 0) & (dx == 0) & (flip == 0)).mean() < 0.1  # about 1 in 50 by chance


def test_torchvision_cutout_zeroes_one_clipped_square_of_its_side(make, run_epoch, source,
                                                                  prepared):
    """The torchvision loader cuts out with a Cutout of its own, per image in its workers (the
    other loaders with augment.cutout, tested in test_augment): each training image is its
    normalized source with one 8 x 8 square, clipped at the border, set to 0 (the mean), its
    centre anywhere (each row and column is one's: in 605 images, one is missed 1 time in 3
    million)."""
    cfg = AugmentConfig(flip=False, translate=0, cutout=8)
    images = torch.cat([images for images, _ in run_epoch(make("torchvision", True,
                                                               augment=cfg), epoch=1)])
    plain = normalized(source.train.images[indices(len(source.train.labels), True, 1)],
                       prepared)
    rows, cols = cutout_centres(images, torch.from_numpy(plain.transpose(0, 3, 1, 2)).float(),
                                cfg.cutout, atol=1e-5)
    assert set(rows.tolist()) == set(cols.tolist()) == set(range(32))


@pytest.mark.parametrize("kind", KINDS)
def test_each_epoch_draws_augmentations_of_its_own(make, run_epoch, source, prepared, kind):
    """The n-th image of epoch 2 is not cropped and flipped as the n-th of epoch 1 was: the
    draws follow the epoch (for torchvision, through its workers' seeds), not only the order."""
    loader = make(kind, True, augment=AugmentConfig(flip=True, translate=2, cutout=0))
    draws = [epoch_draws(run_epoch(loader, epoch), source, prepared, epoch, 2)
             for epoch in (1, 2)]
    assert (draws[0] != draws[1]).any(1).mean() > 0.8  # about 49 in 50 by chance


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_share_the_epoch(make, run_epoch, source, kind, train):
    """Each rank gets its shard of the shared order; training pads explicitly, tests do not."""
    split = split_of(source, train)
    n = len(split.labels)
    shards = []
    for rank in (0, 1):
        loader = make(kind, train, rank=rank, world_size=2)
        batches = run_epoch(loader)
        assert len(batches) == len(loader)
        assert loader.padding == (padding(n, 2) if train else 0)
        labels = labels_of(batches)
        np.testing.assert_array_equal(labels, split.labels[indices(n, train, 0, rank, 2)])
        shards.append(labels)
    assert sum(map(len, shards)) == n + (padding(n, 2) if train else 0)
    if train:  # ranks step in lockstep
        assert len(shards[0]) == len(shards[1])


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_draws_its_own_augmentations(make, run_epoch, source, prepared, kind):
    """Ranks seeded alike gave their k-th images the same flip and shift: half the randomness
    of a global batch. Apart, the k-th draws agree about 1 time in 50 (5 x 5 shifts x 2); each
    rank's images are crops of its own shard's sources."""
    cfg = AugmentConfig(flip=True, translate=2, cutout=0)
    draws = [epoch_draws(run_epoch(make(kind, True, rank=rank, world_size=2, augment=cfg)),
                         source, prepared, 0, cfg.translate, rank=rank, world_size=2)
             for rank in (0, 1)]
    assert (draws[0] == draws[1]).all(axis=1).mean() < 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_beyond_the_shard_is_the_whole_shard(prepared, source, run_epoch, kind):
    """--batch-size 10**15 is one batch of the shard, not buffers of 10**15 images (FFCV's
    allocation overflowed with a traceback)."""
    n = len(source.train.labels)
    loader = loaders.make_loader(kind, prepared.train, train=True, batch_size=10**15,
                                 device="cpu", mean=prepared.mean, std=prepared.std,
                                 augment=AUGMENT, rank=1, world_size=2, workers=1)
    assert loader.batch_size == loader.shard_size == (n + padding(n, 2)) // 2 and len(loader) == 1
    (batch,) = run_epoch(loader)
    np.testing.assert_array_equal(batch[1].numpy(), source.train.labels[indices(n, True, 0, 1, 2)])


@pytest.mark.parametrize("chunk, batch", [(150, 64), (8, 100)],
                         ids=["chunks of two batches", "a batch above the chunk"])
def test_a_resident_epoch_in_several_chunks_is_still_the_shared_order(prepared, source,
                                                                      run_epoch, monkeypatch,
                                                                      chunk, batch):
    """The resident loader gathers CHUNK images at a time (16,384: the suite's splits fit in
    one). Over several chunks an epoch still visits every sample once, in the shared order,
    each image beside its own label, in whole batches; a batch above CHUNK is one chunk."""
    from loaders import resident

    monkeypatch.setattr(resident, "CHUNK", chunk)
    loader = loaders.make_loader("resident", prepared.train, train=True, batch_size=batch,
                                 device="cpu", mean=prepared.mean, std=prepared.std,
                                 augment=None, workers=1)
    batches = run_epoch(loader, 3)
    n = len(source.train.labels)
    order = indices(n, True, epoch=3)
    assert [len(labels) for _, labels in batches] == [batch] * (n // batch) + [n % batch]
    np.testing.assert_array_equal(labels_of(batches), source.train.labels[order])
    images = torch.cat([images for images, _ in batches]).numpy()
    mean, std = (np.reshape(v, (3, 1, 1)) for v in (prepared.mean, prepared.std))
    want = (source.train.images[order].transpose(0, 3, 1, 2) / 255 - mean) / std
    np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)


def test_each_resident_chunk_draws_augmentations_of_its_own(prepared, source, run_epoch,
                                                           monkeypatch):
    """Over several chunks (CHUNK images each: a 50,000-image split is four) the draws go on
    from chunk to chunk: re-seeded per chunk, the k-th image of every chunk would be cropped
    and flipped alike. Apart, two images' draws agree about 1 time in 50."""
    from loaders import resident

    monkeypatch.setattr(resident, "CHUNK", 150)  # chunks of two batches of 64
    cfg = AugmentConfig(flip=True, translate=2, cutout=0)
    loader = loaders.make_loader("resident", prepared.train, train=True, batch_size=BATCH,
                                 device="cpu", mean=prepared.mean, std=prepared.std,
                                 augment=cfg, workers=1)
    draws = epoch_draws(run_epoch(loader, 1), source, prepared, 1, cfg.translate)
    chunk = 2 * BATCH
    assert (draws[:chunk] == draws[chunk:2 * chunk]).all(1).mean() < 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_a_last_batch_of_one_sample_keeps_its_batch_dimension(prepared, source, run_epoch, kind):
    """201 test images in batches of 100: the last holds one sample, its label a 1-d tensor."""
    loader = loaders.make_loader(kind, prepared.test, train=False, batch_size=100, device="cpu",
                                 mean=prepared.mean, std=prepared.std, workers=1)
    batches = run_epoch(loader)
    assert [len(labels) for _, labels in batches] == [100, 100, 1]
    assert len(loader) == 3  # the steps an epoch takes count the last, short batch
    images, labels = batches[-1]
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1,)
    assert labels.item() == source.test.labels[-1]


def test_a_batch_of_no_image_is_refused_by_name_and_one_image_is_a_batch():
    """A batch size of 0 is refused when the loader is made (it was a ZeroDivisionError from
    len(), or a loader that never ends); 1 is the smallest batch, a batch per image."""
    kwargs = dict(train=False, device="cpu", num_samples=10, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ValueError, match="^batch_size must be at least 1, got 0$"):
        BatchLoader(Path("test.beton"), batch_size=0, **kwargs)
    assert len(BatchLoader(Path("test.beton"), batch_size=1, **kwargs)) == 10


@pytest.mark.parametrize("local, per_process", [(None, 1), ("2", 4), ("²", 1), ("0", 1)],
                         ids=["one machine", "2 per machine", "no count", "zero"])
def test_default_workers_share_this_machines_cores_among_its_own_processes(
        monkeypatch, local, per_process):
    """8 processes of a run on 4 machines (2 each) share each machine's 8 cores 2 ways, not
    8 ways; with no LOCAL_WORLD_SIZE (one machine) all 8 processes share them."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert default_workers(8) == per_process
    assert default_workers() == 8  # one process: all the cores, whatever the launcher said


# --- the sharding rule ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [605, 10, 1])
def test_training_indices_are_a_new_permutation_each_epoch(n):
    epochs = [indices(n, True, epoch=e) for e in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    if n > 2:
        assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("n,world_size", [
    (605, 2), (10, 3), (10, 4), (7, 7), (3, 8),
])
def test_ranks_cover_every_training_index_with_explicit_padding(n, world_size):
    shards = [indices(n, True, 0, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1  # every rank takes as many steps
    counts = np.bincount(np.concatenate(shards), minlength=n)
    assert (counts >= 1).all()
    assert (counts - 1).sum() == padding(n, world_size)  # repeats are exactly the padding


@pytest.mark.parametrize("n,world_size", [
    (201, 2), (10, 3), (8, 8), (3, 8),
])
def test_ranks_split_evaluation_indices_without_duplicates(n, world_size):
    shards = [indices(n, False, 0, rank, world_size) for rank in range(world_size)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("rank", [2, -1])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_rank_outside_the_world_is_refused(rank, train):
    """A negative rank (-1, "no rank" to some launch scripts) is refused too: taken, it would
    slice from the end, and that rank would visit one sample an epoch, silently."""
    with pytest.raises(ValueError, match=f"rank {rank} is outside 0..1"):
        epoch_indices(10, epoch=0, seed=0, shuffle=train, rank=rank, world_size=2)


def test_unknown_loader_kind_is_refused(prepared):
    with pytest.raises(ValueError, match="unknown loader"):
        loaders.make_loader("dali", prepared.test, train=False, batch_size=8, device="cpu",
                            mean=prepared.mean, std=prepared.std)


# --- the FFCV hang guard ----------------------------------------------------------------------

FAILING_PIPELINE = """
import sys
from dataclasses import replace

from common.errors import LoaderError
from loaders.guards import guarded, importing_ffcv

with importing_ffcv():
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.operation import Operation


class Explode(Operation):
    def generate_code(self):
        def explode(images, destination):
            raise ValueError("boom in the pipeline")
        return explode

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), None


loader = Loader(sys.argv[1], batch_size=32, num_workers=1, order=OrderOption.SEQUENTIAL,
                pipelines={"image": [SimpleRGBImageDecoder(), Explode()],
                           "label": [IntDecoder()]})
try:
    for _ in guarded(loader):
        pass
except LoaderError as error:
    print(error)
    sys.exit(0)
sys.exit("guarded() ended without raising")
"""


@pytest.mark.slow
def test_guard_turns_a_failing_ffcv_pipeline_into_loader_error(prepared):
    result = subprocess.run([sys.executable, "-c", FAILING_PIPELINE, str(prepared.test)],
                            capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "ValueError: boom in the pipeline" in result.stdout
    assert str(prepared.test) in result.stdout


def _interrupted(*args, **kwargs) -> None:
    """A wait that a Ctrl-C interrupts."""
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop", ["close", "ctrl-c"], ids=["closed", "Ctrl-C in next()"])
def test_an_ffcv_epoch_left_early_tells_its_pipeline_thread_to_stop(make, stop):
    """A Ctrl-C, an error or a break mid-epoch stops FFCV's pipeline thread, which otherwise
    stayed alive for the rest of the process: the epoch closed (a break, or an error in the
    loop over it), or a Ctrl-C raised in next() as it waits for FFCV's next batch (here by
    that wait), which closes nothing: the guard closes FFCV's epoch itself."""
    before = set(threading.enumerate())
    batches = iter(make("ffcv", True, copy=1))
    next(batches)
    (pipeline,) = set(threading.enumerate()) - before  # FFCV's EpochIterator
    assert pipeline.is_alive()  # producing the batches ahead, or waiting for room for them
    if stop == "close":
        batches.close()
    else:
        pipeline.output_queue.get = _interrupted  # where next() waits for a batch
        with pytest.raises(KeyboardInterrupt):
            next(batches)
    pipeline.join(timeout=60)
    assert not pipeline.is_alive()


EXIT_AFTER_AN_EPOCH_LEFT_EARLY = """
import atexit, sys, threading
from llvmlite.binding import ffi
import loaders
from loaders.options import AugmentConfig

taken, exiting = [], threading.Event()

def call_llvm():  # started now: Python 3.12 starts no thread at exit
    exiting.wait()
    taken.append(ffi.lib._lock._lock.acquire(timeout=1))

other = threading.Thread(target=call_llvm, daemon=True)  # daemon: not waited for before atexit
other.start()

def at_exit():  # registered first, so it runs after the guard's callback
    exiting.set()
    other.join()
    print("another thread can call LLVM at exit:", taken[0])

atexit.register(at_exit)
loader = loaders.make_loader("ffcv", sys.argv[1], train=True, batch_size=64, device="cpu",
                             mean=[0.5] * 3, std=[0.25] * 3, augment=AugmentConfig(), seed=0,
                             workers=1)
next(iter(loader))
sys.exit(3)
"""


@pytest.mark.slow
def test_at_exit_no_other_thread_can_enter_llvm(prepared):
    """A process that leaves while FFCV's thread still compiles its first epoch's pipeline
    (Ctrl-C, an error) crashed: the thread went on in LLVM while the process tore LLVM down, a
    segfault or an LLVM assertion (benchmarks/results/ffcv-stop-during-jit-cpu-2core.log: 13
    of 20 Ctrl-Cs). At exit the guard holds llvmlite's lock, which every LLVM call takes."""
    result = subprocess.run([sys.executable, "-c", EXIT_AFTER_AN_EPOCH_LEFT_EARLY,
                             str(prepared.train)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "another thread can call LLVM at exit: False"


def test_an_ffcv_epoch_leaves_torchs_threads_as_they_were(make):
    """FFCV sets torch's intra-op threads to its worker count in every iter(), not only when a
    Loader is made: training on the CPU went on with --workers threads (here one)."""
    loader, threads = make("ffcv", True), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = [torch.get_num_threads() for _ in loader]  # workers=1: FFCV would make it 1
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_making_an_ffcv_loader_leaves_torchs_threads_as_they_were(prepared):
    """FFCV's Loader() sets torch's intra-op threads to its workers, as each iter() does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loaders.make_loader("ffcv", prepared.test, train=False, batch_size=BATCH, device="cpu",
                            mean=prepared.mean, std=prepared.std, workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_ffcv_batches_kept_past_the_next_one_stay_as_they_were(make, source):
    """On the CPU each FFCV batch is the caller's own, kept uncopied (a list of an epoch's
    batches): FFCV refills its host buffers once the next batch is asked for (an epoch of more
    batches than it has buffers: the training split's)."""
    loader = make("ffcv", True)
    loader.set_epoch(0)
    kept = list(loader)
    order = indices(len(source.train.labels), True)
    np.testing.assert_array_equal(torch.cat([labels for _, labels in kept]).numpy(),
                                  source.train.labels[order])


IMPORT_EVERYTHING = """
import importlib, pkgutil, sys, threading, torch
torch.set_num_threads(2)
hook = threading.excepthook
import loaders
assert "ffcv" not in sys.modules, "importing loaders imported FFCV"
for package in ("common", "loaders", "engine", "tools"):
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")
assert "ffcv" in sys.modules  # loaders.stream imports it: the check below means something
assert torch.get_num_threads() == 2, f"torch threads became {torch.get_num_threads()}"
assert threading.excepthook is hook, "an import replaced threading.excepthook"
import numba.typed
from numba.typed import typeddict
assert numba.typed.Dict is typeddict.Dict, "numba.typed.Dict was left patched"
from ffcv.fields.rgb_image import IMAGE_MODES
assert IMAGE_MODES == {"jpg": 0, "raw": 1} and type(IMAGE_MODES) is dict
assert not typeddict._setitem.signatures, "importing FFCV JIT-compiled numba's typed dict"
print("ok")
"""


@pytest.mark.slow
def test_importing_any_module_changes_no_process_state():
    """FFCV's import sets torch to one thread; no module of ours may leave that (or any other
    process-wide setting) changed by being imported. guards.importing_ffcv's plain dict for
    FFCV's IMAGE_MODES spares the typed dict's compile and leaves numba as it was."""
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


PREPARE_WITHOUT_OPENCV = """
import runpy, sys
sys.modules["cv2"] = None  # opencv's Python package gone, as when a library it loads is missing
sys.argv[0] = "loaders/prepare.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


START_NUMBA_THREADS = """
import numba, numpy
from loaders.guards import importing_ffcv

@numba.njit(parallel=True)
def total(x):
    s = 0.0
    for i in numba.prange(len(x)):
        s += x[i]
    return s

with importing_ffcv():  # FFCV's import starts numba's threads; here a parallel function does
    total(numpy.ones(8))
print(numba.threading_layer())
"""


def test_a_system_tbb_too_old_for_numba_is_passed_over_silently(tmp_path):
    """Ubuntu 22.04's libtbb (2021.5, which opencv brings) is older than numba's TBB layer
    needs: numba takes its next layer, and its warning saying so came before every command's
    own lines. Here a library of that name and version, found first, stands in for it (not
    with FFCV: opencv would load it too, and miss the rest of TBB)."""
    stand_in = tmp_path / "tbb.c"
    stand_in.write_text("int TBB_runtime_interface_version(void) { return 12050; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libtbb.so.12"),
                    str(stand_in)], check=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path),
           "NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"}  # TBB first, on any core count
    result = subprocess.run([sys.executable, "-c", START_NUMBA_THREADS], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
    assert result.stdout.strip() in ("omp", "workqueue")


def test_a_threading_layer_order_the_user_chose_is_kept_on_one_core():
    """On one core importing_ffcv puts TBB last (it hangs there at exit), but only where the
    user chose no order: NUMBA_THREADING_LAYER_PRIORITY, when set, is the order numba takes."""
    env = {**os.environ, "NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb"}
    core = {min(os.sched_getaffinity(0))}
    result = subprocess.run([sys.executable, "-c", START_NUMBA_THREADS], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, core))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "workqueue"


def test_numba_takes_no_tbb_on_one_core_unless_the_user_chose_it():
    """With one core and no order chosen, numba's TBB layer, its first choice, started no
    worker and then hung the process at exit (numba#10556): importing_ffcv puts it last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    core = {min(os.sched_getaffinity(0))}
    result = subprocess.run([sys.executable, "-c", START_NUMBA_THREADS], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, core))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() in ("omp", "workqueue")


# prepare, with cv2's import failing in a plain ImportError, no ModuleNotFoundError, that says
# {message}; {prelude} runs first
PREPARE_WITH_CV2_FAILING = """
import resource, runpy, sys
{prelude}
class Cv2Fails:
    def find_spec(self, name, path=None, target=None):
        if name == "cv2":
            raise ImportError({message!r})
sys.meta_path.insert(0, Cv2Fails())
sys.argv[0] = "loaders/prepare.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# a compiled module whose shared library is gone
PREPARE_WITHOUT_LIBOPENCV = PREPARE_WITH_CV2_FAILING.format(
    prelude="", message="libopencv_core.so.406: cannot open shared object file")


@pytest.mark.parametrize("code, why", [
    (PREPARE_WITHOUT_OPENCV, "ModuleNotFoundError: import of cv2 halted; None in sys.modules"),
    (PREPARE_WITHOUT_LIBOPENCV, "ImportError: libopencv_core.so.406: cannot open shared object "
                                "file"),
], ids=["package gone", "library gone"])
def test_ffcv_that_cannot_be_imported_is_one_setup_error(tmp_path, code, why):
    """FFCV's ImportError (opencv or turbojpeg missing) was a traceback of every command that
    prepares or loads data."""
    result = subprocess.run([sys.executable, "-c", code, "--dataset",
                             "synthetic", "--synthetic-size", "20", "5", "--data-dir", tmp_path],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stderr == (
        f"error: FFCV cannot be imported ({why}); install the system libraries it is built "
        "against (apt-get install "
        "libopencv-dev libturbojpeg0-dev pkg-config) and the project's Python packages: "
        "`rm .venv/.installed; make setup` does both.\n")


def test_ffcv_that_does_not_fit_under_ulimit_v_names_the_limit_not_an_install(tmp_path):
    """An opencv that did not fit under `ulimit -v` was told to install the system libraries,
    which are there."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = 2**46 if hard == resource.RLIM_INFINITY else hard  # torch fits: only cv2 fails
    # glibc's words, seen at `ulimit -v 3500000`, where torch fitted and FFCV's opencv did not
    code = PREPARE_WITH_CV2_FAILING.format(
        prelude=f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {hard}))",
        message="/lib/cv2.abi3.so: failed to map segment from shared object")
    result = subprocess.run([sys.executable, "-c", code, "--dataset", "synthetic",
                             "--synthetic-size", "20", "5", "--data-dir", tmp_path],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stderr == (
        f"error: FFCV cannot load under this process's address-space limit (ulimit -v "
        f"{limit // 1024} KiB: /lib/cv2.abi3.so does not fit); raise it (`ulimit -v "
        "unlimited`; torch takes several GiB of address space) and run again.\n")


def test_the_failure_hook_is_installed_once_and_chains(prepared):
    """guards.install_failure_hook is idempotent and hands other threads' errors on."""
    seen = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    try:
        guards.install_failure_hook()
        installed = threading.excepthook
        guards.install_failure_hook()
        assert threading.excepthook is installed
        worker = threading.Thread(target=lambda: 1 / 0)
        worker.start()
        worker.join()
        assert len(seen) == 1 and isinstance(seen[0], ZeroDivisionError)
    finally:
        threading.excepthook = previous


def test_torchvision_workers_end_with_their_epoch(make):
    """Joined when the epoch ends or is abandoned, not left to the garbage collector (which
    would make each wait out a 5 s timeout when the loader is in a reference cycle)."""
    loader = make("torchvision", True, copy=2)
    for _ in loader:
        assert multiprocessing.active_children()  # the epoch's workers
    assert multiprocessing.active_children() == []
    batches = iter(loader)
    next(batches)
    batches.close()  # a pass stopped early, as a benchmark or a failed step does
    assert multiprocessing.active_children() == []


def test_a_torchvision_epoch_blocks_stop_signals_in_neither_this_thread_nor_its_workers(make):
    """iter() forks the workers with Ctrl-C, SIGTERM and SIGHUP blocked in this thread: left
    blocked here, a Ctrl-C reached the command only through another thread, or never; left
    blocked in a worker, a stop sent to it waited for the end of the epoch."""

    def blocked(pid: int) -> set[int]:
        status = Path(f"/proc/{pid}/status").read_text()
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
        return {s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if mask >> (s - 1) & 1}

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = iter(make("torchvision", True, copy=3))
    next(batches)  # each worker ran its init before it made a batch
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        workers = [pid for pid, _ in children(os.getpid())]
        assert workers and all(blocked(pid) == set() for pid in workers)
    finally:
        batches.close()


def test_torchvision_workers_are_forked_whatever_pythons_default(make):
    """Forked, as up to Python 3.13, not started by 3.14's forkserver, which pickles the dataset
    (the whole split) to every worker of every epoch: a transform that cannot be pickled, as a
    notebook's lambda, still runs in the workers."""
    loader = make("torchvision", True, copy=3)  # its own: the transform is replaced
    loader.loader.dataset.transform = lambda image: torch.full((3, 32, 32), 7.0)
    batches = list(loader)
    assert batches and all(bool((images == 7).all()) for images, _ in batches)
    assert loader.loader.multiprocessing_context.get_start_method() == "fork"


def _killed(image) -> None:
    """A transform that ends its worker as the OOM killer does: SIGKILL, no goodbye."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_torchvision_worker_ignores_what_its_command_ignores():
    """A script's background job ignores Ctrl-C, and so does the command
    (common.stop_signals): its workers took it up again, died of the group's Ctrl-C, and the
    command failed on them."""
    code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from loaders.baseline import _stop_quietly\n"
            "_stop_quietly(0)\n"
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,\n"
            "      signal.getsignal(signal.SIGTERM) is signal.default_int_handler)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout == "True True\n", result.stderr[-2000:]


def _hung_up(image) -> torch.Tensor:
    """A transform that gets its worker the SIGHUP a closed terminal sends the whole group."""
    os.kill(os.getpid(), signal.SIGHUP)
    return torch.zeros(3, 32, 32)


def test_torchvision_workers_of_a_nohup_run_outlive_the_terminal(make):
    """`nohup` ignores SIGHUP, and so does the command; its workers, forked while the loader
    held the stop signals (common.stop_signals.stop_signals_held, whose note had replaced the
    ignored disposition), took SIGHUP up again: a closed terminal ended them, and the run
    failed on its dead workers."""
    loader = make("torchvision", False, copy=4)  # its own: the transform is replaced
    loader.loader.dataset.transform = _hung_up
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert sum(len(labels) for _, labels in loader) == loader.num_samples
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_killed_torchvision_worker_is_one_loader_error(prepared):
    """torch's RuntimeError "DataLoader worker (pid N) is killed by signal" was a traceback;
    it names the likely cause and the fix, and leaves no worker behind."""
    loader = loaders.make_loader("torchvision", prepared.test, train=False, batch_size=BATCH,
                                 device="cpu", mean=prepared.mean, std=prepared.std, workers=1)
    loader.loader.dataset.transform = _killed  # the first image a worker reads kills it
    with pytest.raises(LoaderError) as error:
        next(iter(loader))
    assert re.fullmatch(
        rf"a --loader torchvision worker reading {re.escape(str(prepared.test))} died "
        r"\(RuntimeError: DataLoader worker \(pid.*\); most often the system ran out of "
        r"memory: pass fewer --workers \(here 1\), or use --loader ffcv\.", str(error.value))
    assert multiprocessing.active_children() == []


def test_a_worker_death_that_broke_a_batchs_hand_over_is_named(prepared):
    """A worker killed as it handed a batch over broke the connection the batch's shared memory
    comes through: next() raised ConnectionResetError before torch's SIGCHLD handler said why,
    and the run ended in a traceback (a CI run's). Asked of torch, the death is named."""
    loader = loaders.make_loader("torchvision", prepared.test, train=False, batch_size=BATCH,
                                 device="cpu", mean=prepared.mean, std=prepared.std, workers=1)
    batches = iter(loader.loader)  # its worker started, and known to torch
    (worker,) = multiprocessing.active_children()
    # as in that run: the death not yet handled (torch's handler says it once, then forgets)
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        os.kill(worker.pid, signal.SIGKILL)
        stat = Path(f"/proc/{worker.pid}/stat")  # its state is a zombie's once it died
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", 60,
                   "the worker outlived SIGKILL", interval=0.01)
        died = loader.worker_died(ConnectionResetError(errno.ECONNRESET, "Connection reset"))
    finally:
        signal.signal(signal.SIGCHLD, handler)
    del batches  # its workers shut down
    assert died is not None and "is killed by signal: Killed" in str(died), died
    assert loader.worker_died(ConnectionResetError(errno.ECONNRESET, "a socket's")) is None


def test_a_worker_death_that_broke_the_code_it_interrupted_is_still_named(prepared):
    """torch's SIGCHLD handler raised its RuntimeError inside Thread.start, whose bookkeeping
    then failed with a KeyError holding torch's error as its context: a traceback in a CI run."""
    loader = loaders.make_loader("torchvision", prepared.test, train=False, batch_size=BATCH,
                                 device="cpu", mean=prepared.mean, std=prepared.std, workers=1)
    try:
        try:
            raise RuntimeError("DataLoader worker (pid 6547) is killed by signal: Killed. ")
        except RuntimeError:
            raise KeyError("<Thread(QueueFeederThread, started daemon)>") from None
    except KeyError as broken:
        died = loader.worker_died(broken)
    assert isinstance(died, LoaderError) and "(RuntimeError: DataLoader worker (pid 6547)" in str(
        died) and "pass fewer --workers (here 1)" in str(died)
    assert loader.worker_died(KeyError("no worker died")) is None


def test_more_ffcv_workers_than_numba_may_start_is_one_clear_error(prepared):
    """FFCV's workers are numba threads, at most NUMBA_NUM_THREADS of them: more was a
    traceback from numba, after the data was prepared."""
    from numba import config

    too_many = config.NUMBA_NUM_THREADS + 1
    with pytest.raises(LoaderError, match=f"--workers {too_many}: FFCV's workers are numba "
                       f"threads.* pass --workers {config.NUMBA_NUM_THREADS} or fewer"):
        loaders.make_loader("ffcv", prepared.train, train=True, batch_size=BATCH, device="cpu",
                            mean=prepared.mean, std=prepared.std, workers=too_many)


def test_as_many_ffcv_workers_as_numba_threads_are_taken():
    """The limit itself is allowed: --workers NUMBA_NUM_THREADS is taken as asked, not
    refused (test_ffcv_workers_left_to_their_default_stay_within_numba_threads reads a split
    with a loader of as many workers as numba threads)."""
    from numba import config

    assert guards.numba_workers(config.NUMBA_NUM_THREADS, 1) == config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("name, value", [
    *(("NUMBA_THREADING_LAYER", layer) for layer in (
        "default", "safe", "threadsafe", "forksafe", *guards.NUMBA_LAYERS)),
    ("NUMBA_THREADING_LAYER_PRIORITY", "workqueue omp tbb"),
    ("NUMBA_NUM_THREADS", "1"),
])
def test_numba_settings_numba_takes_are_not_refused(monkeypatch, name, value):
    """Every threading layer numba knows, any order of its three layers and a count of 1 pass
    numba_settings_checked (refusing one would stop every command that reads data)."""
    monkeypatch.setenv(name, value)
    guards.numba_settings_checked()


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_a_numba_thread_count_that_is_no_count_is_refused(monkeypatch, value):
    """NUMBA_NUM_THREADS below 1 failed inside numba's import, a traceback; one that is no
    number was numba's warning, with a traceback in it, and then every core anyway."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", value)
    with pytest.raises(SetupError) as refused:
        guards.numba_settings_checked()
    assert str(refused.value) == (
        f"NUMBA_NUM_THREADS={value!r} is not a number of threads: numba (FFCV's compiler) "
        "needs a whole number of at least 1; unset it (`unset NUMBA_NUM_THREADS`) for as many "
        "as this process may use.")


def test_far_more_ffcv_workers_than_numba_threads_names_the_limit():
    """The advice names numba's limit, whatever --workers asked for."""
    from numba import config

    threads = config.NUMBA_NUM_THREADS
    with pytest.raises(LoaderError, match=f"^--workers {threads + 5}: .* pass --workers "
                                          f"{threads} or fewer.$"):
        guards.numba_workers(threads + 5, 1)


@pytest.mark.parametrize("order", ["omp omp tbb workqueue", "omp tbb tbb", "omp tbb"])
def test_a_threading_layer_order_naming_a_layer_twice_or_leaving_one_out_is_refused(
        monkeypatch, order):
    """The order must name each of numba's three layers exactly once."""
    monkeypatch.setenv("NUMBA_THREADING_LAYER_PRIORITY", order)
    with pytest.raises(SetupError, match="is not an order of numba's three threading layers"):
        guards.numba_settings_checked()


DEFAULT_FFCV_WORKERS = """
import sys
import loaders
from pathlib import Path
from loaders.beton import sidecar_state
loader = loaders.make_loader("ffcv", sys.argv[1], train=False, batch_size=64, device="cpu",
                             mean=[0.5] * 3, std=[0.25] * 3)
print(loader.workers, sum(len(labels) for _, labels in loader),
      sidecar_state(Path(sys.argv[1]))[0].num_samples)
"""


@pytest.mark.skipif(len(MACHINE_CORES) < 2, reason="needs 2 cores: the default is 1 on one")
def test_ffcv_workers_left_to_their_default_stay_within_numba_threads(prepared):
    """NUMBA_NUM_THREADS=1 on 2 cores: the default, 2, was refused, naming a --workers 2
    nobody passed."""
    result = subprocess.run(
        [sys.executable, "-c", DEFAULT_FFCV_WORKERS, str(prepared.test)], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env={**os.environ, "NUMBA_NUM_THREADS": "1"},
        preexec_fn=lambda: os.sched_setaffinity(0, MACHINE_CORES))
    assert result.returncode == 0, result.stderr[-2000:]
    workers, seen, samples = map(int, result.stdout.split())
    assert workers == 1 and seen == samples


def test_more_torchvision_workers_than_cores_is_one_clear_error(prepared):
    """Each of its workers is a process: --workers 99999999999 started them until the machine's
    memory ran short (hundreds in seconds), and a stop signal left some behind."""
    cores = available_cores()
    with pytest.raises(LoaderError, match=f"^--workers {cores + 1}: this process may use {cores} "
                       f"cores?; pass --workers {cores}( or fewer)?$"):
        loaders.make_loader("torchvision", prepared.train, train=True, batch_size=BATCH,
                            device="cpu", mean=prepared.mean, std=prepared.std,
                            workers=cores + 1)

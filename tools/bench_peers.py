"""The peers section of tools/bench.py: the fastest public CIFAR-10 loaders beside ours, on the
same split, in the same process, their epochs taken in turns, each ours compared with the peer
whose augmentations and output it matches; then the seed notebook's training epoch beside the
default preset's."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.profiler import profile

from common.errors import one_line
from common.hardware import default_workers
from common.streams import Log, silent
from engine.config import PRESETS, TrainConfig
from engine.run import DTYPES, prepare_data
from loaders import beton
from loaders.base import BatchLoader
from loaders.guards import guarded, importing_ffcv, numba_workers, torch_threads_kept
from loaders.preparation import Prepared
from tools.bench_mfu import count_train_flops
from tools.bench_names import peer_name
from tools.bench_profile import (
    NO_DEVICE_EVENTS,
    activities,
    device_busy_ms,
    device_events,
    top_ops,
)
from tools.bench_setup import (
    MEASURE_ERRORS,
    base_config,
    build_loader,
    make_run,
    pin_threads,
    release,
)
from tools.timing import Pass, fastest, loader_pass, take_turns, train_pass

BENCH_EXTRA = "pip install -e '.[bench]' (or: make bench)"
# what a peer's loader may raise (foreign code: more than ours), recorded in its row
PEER_ERRORS = (*MEASURE_ERRORS, ValueError, TypeError, LookupError, AssertionError, OSError)


@dataclass
class PeerResult:
    """One loader of the peers table: a public peer, or ours set up to match one."""

    loader: str
    role: str  # "peer", or "ours" for this engine's loaders
    augment: str  # what every image goes through
    status: str = "ok"  # "not installed" or "failed": see reason
    reason: str = ""
    output: str = ""  # dtype, shape and memory format of the first batch
    images: int | None = None  # per epoch
    construct_s: float | None = None
    first_epoch_s: float | None = None  # warm-up epoch: numba JIT, first-epoch caches
    epoch_s: list[float] | None = None  # steady-state epochs
    images_per_s: float | None = None  # of the fastest steady-state epoch
    versus: str = ""  # the peer this row of ours is compared with
    ratio: float | None = None  # images_per_s over versus's
    # one more epoch under torch.profiler, after the timed ones: the op that took the most
    # time (on the device on a GPU, else on the host; none for a loader whose transforms run on
    # a thread of its own: stock FFCV's) and, on a GPU, how long the device ran
    # anything in that epoch and how many kernels, copies and fills it ran; the rest of an
    # epoch's time is launches and host work
    top_op: str = ""
    device_busy_ms: float | None = None
    device_events: int | None = None


@dataclass
class SeedEpochResult:
    """A full training epoch of the seed notebook's pipeline or of the default preset."""

    pipeline: str  # "seed" or "default"
    loader: str
    precision: str
    compile: bool
    channels_last: bool
    batch_size: int
    width: int
    images: int  # per epoch
    train_flops_per_image: int  # counted (bench_mfu.count_train_flops), forward and backward
    first_epoch_s: float
    epoch_s: list[float]
    images_per_s: float  # of the fastest steady-state epoch
    vs_seed: float = 0.0  # images_per_s over the seed pipeline's


class Timed:
    """A peer's loader behind the interface tools.timing.loader_pass times (EpochLoader).
    `own_thread`: its transforms run on a thread of its own, whose ops torch.profiler (which
    records the thread that started it) never sees."""

    def __init__(self, batches: Callable[[], Iterator], device: torch.device,
                 own_thread: bool = False):
        self.batches, self.device, self.own_thread = batches, device, own_thread

    def set_epoch(self, epoch: int) -> None:
        """Peers count their own epochs."""

    def __iter__(self) -> Iterator:
        return self.batches()


Measured = Timed | BatchLoader  # what loader_pass times: a peer's loader or one of ours


def describe(images: torch.Tensor) -> str:
    """'float16 3x32x32 channels_last': what a loader hands over, to show outputs match."""
    layout = ("channels_last" if images.is_contiguous(memory_format=torch.channels_last)
              else "contiguous")
    return f"{str(images.dtype).removeprefix('torch.')} {'x'.join(map(str, images.shape[1:]))} " \
           f"{layout}"


def airbench_loader(data: Prepared, cfg: TrainConfig, device: torch.device,
                    folder: Path) -> Timed:
    """airbench.CifarLoader over our training split, written as the train.pt it reads, with
    flip and translate 2 (its reflect padding) at our batch size; its output is always fp16."""
    autotune = torch.backends.cudnn.benchmark
    try:
        from airbench import CifarLoader  # ModuleNotFoundError when the [bench] extra is missing
    finally:  # its modules turn cuDNN's autotuning on at import, for every later measurement
        torch.backends.cudnn.benchmark = autotune

    split = beton.read(data.train)
    torch.save({"images": torch.from_numpy(split.images), "labels": torch.from_numpy(split.labels),
                "classes": list(data.classes)}, folder / "train.pt")
    # every image of the split in every epoch, as ours (its training default drops the last
    # partial batch, after augmenting it: fewer images counted than made)
    loader = CifarLoader(str(folder), train=True, batch_size=cfg.batch_size,
                         aug=dict(flip=True, translate=cfg.translate), drop_last=False,
                         gpu=device)
    return Timed(lambda: iter(loader), device)


def stock_ffcv_loader(data: Prepared, cfg: TrainConfig, device: torch.device) -> Timed:
    """FFCV's Loader with its own numba flip and translate (zero fill), optional cutout, and on a
    GPU the tail of its CIFAR example (examples/cifar/train_cifar.py): ToTensor, ToDevice,
    ToTorchImage, Convert to the training dtype, torchvision's Normalize. The example has no
    CPU path; there ours is FFCV's numba NormalizeImage before ToTensor."""
    with importing_ffcv():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (
            Convert,
            Cutout,
            NormalizeImage,
            RandomHorizontalFlip,
            RandomTranslate,
            Squeeze,
            ToDevice,
            ToTensor,
            ToTorchImage,
        )
    from torchvision.transforms import Normalize
    dtype = DTYPES[cfg.precision]
    mean, std = np.array(data.mean) * 255, np.array(data.std) * 255
    fill = tuple(int(round(m)) for m in mean)
    augment = [RandomHorizontalFlip(), RandomTranslate(padding=cfg.translate, fill=(0, 0, 0)),
               *([Cutout(cfg.cutout, fill)] if cfg.cutout else [])]
    if device.type == "cpu":
        # numpy has no bfloat16: normalize to fp32 and let Convert make the training dtype
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        tail = [NormalizeImage(mean, std, np_dtype), ToTensor(), ToTorchImage(), Convert(dtype)]
    else:
        tail = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(), Convert(dtype),
                Normalize(mean.tolist(), std.tolist())]
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    with torch_threads_kept():
        loader = Loader(str(data.train), batch_size=cfg.batch_size,
                        num_workers=numba_workers(cfg.workers, default_workers()),
                        order=OrderOption.RANDOM, drop_last=False, os_cache=True, pipelines={
                            "image": [SimpleRGBImageDecoder(), *augment, *tail],
                            "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device]})
    return Timed(lambda: iter(guarded(loader)), device, own_thread=True)


def ours(kind: str, data: Prepared, cfg: TrainConfig, device: torch.device) -> BatchLoader:
    """One of our loaders as engine.run.build makes it, for cfg's augmentations and dtype."""
    loader, _ = build_loader(kind, data, cfg, device)
    return loader


def augment_text(cfg: TrainConfig) -> str:
    """'flip, translate 2 reflect': the augmentations a row's images go through."""
    return f"flip, translate {cfg.translate} {cfg.pad_mode}" + (
        f", cutout {cfg.cutout}" if cfg.cutout else "")


def lineup(data: Prepared, cfg: TrainConfig, device: torch.device,
           folder: Path) -> list[tuple[PeerResult, Callable[[], Measured]]]:
    """Every row and how to build its loader: each peer, then ours set up like it.

    airbench pads by reflection and hands over fp16 (ours beside it in fp16, then in the
    training dtype); stock FFCV pads with zeros and hands over the training dtype; the seed
    notebook's DataLoader is ours at the engine's defaults.
    """
    air = replace(cfg, precision="fp16", pad_mode="reflect", cutout=0)
    stock = replace(cfg, pad_mode="zeros")
    reflect = replace(cfg, pad_mode="reflect")
    rows = [
        (PeerResult("airbench.CifarLoader", "peer", augment_text(air)),
         lambda: airbench_loader(data, air, device, folder)),
        (PeerResult("resident", "ours", augment_text(air), versus="airbench.CifarLoader"),
         lambda: ours("resident", data, air, device)),
        (PeerResult("resident", "ours", augment_text(reflect), versus="airbench.CifarLoader"),
         lambda: ours("resident", data, reflect, device)),
        (PeerResult("stock ffcv.Loader", "peer", augment_text(stock)),
         lambda: stock_ffcv_loader(data, stock, device)),
        (PeerResult("ffcv", "ours", augment_text(stock), versus="stock ffcv.Loader"),
         lambda: ours("ffcv", data, stock, device)),
        (PeerResult("resident", "ours", augment_text(stock), versus="stock ffcv.Loader"),
         lambda: ours("resident", data, stock, device)),
        (PeerResult("seed torchvision DataLoader", "peer", augment_text(reflect)),
         lambda: ours("torchvision", data, reflect, device)),
        (PeerResult("resident", "ours", augment_text(reflect),
                    versus="seed torchvision DataLoader"),
         lambda: ours("resident", data, reflect, device)),
        (PeerResult("ffcv", "ours", augment_text(reflect),
                    versus="seed torchvision DataLoader"),
         lambda: ours("ffcv", data, reflect, device)),
    ]
    return rows


def construct(row: PeerResult, make: Callable[[], Measured]) -> Measured | None:
    """Build a row's loader, or record why it cannot run here (not installed, failed)."""
    start = time.perf_counter()
    try:
        loader = make()
    except ModuleNotFoundError as error:
        row.status, row.reason = "not installed", f"no module '{error.name}': {BENCH_EXTRA}"
        return None
    except PEER_ERRORS as error:
        row.status, row.reason = "failed", one_line(error)
        return None
    row.construct_s = time.perf_counter() - start
    return loader


def profile_epoch(row: PeerResult, loader: Measured, epoch: int, log: Log = silent) -> None:
    """One more epoch of a loader under torch.profiler, into its row's top_op and, on a GPU,
    device_busy_ms and device_events: whether an epoch's time is the device's or the host's."""
    cuda = loader.device.type == "cuda"
    try:
        with profile(activities=activities(cuda)) as prof:
            loader_pass(loader, epoch)
    except PEER_ERRORS as error:  # the timed epochs stand; the row only lacks its profile
        log(f"peers: {row.loader}: the profiled epoch failed: {one_line(error)}")
        return
    sort_by, ops = top_ops(prof, cuda)
    if ops and not getattr(loader, "own_thread", False):  # else an op of this thread's, idle
        row.top_op = f"{ops[0]['name']} {ops[0][sort_by]:.2f} ms"
    if cuda:
        events = device_events(prof)
        row.device_busy_ms, row.device_events = device_busy_ms(events), len(events)
        if row.device_busy_ms is None:
            log(f"peers: {row.loader}: {NO_DEVICE_EVENTS}")


def score(rows: list[PeerResult]) -> None:
    """Each row's ratio to the peer it is set beside, from the fastest steady epochs so far."""
    speed = {r.loader: r.images_per_s for r in rows if r.role == "peer"}
    for r in rows:
        r.ratio = (r.images_per_s / speed[r.versus]
                   if r.versus and r.images_per_s and speed.get(r.versus) else None)


def bench_peer_loaders(data: Prepared, cfg: TrainConfig, device: torch.device,
                       args: argparse.Namespace, folder: Path,
                       save: Callable[[list[PeerResult]], None],
                       log: Log = silent) -> list[PeerResult]:
    """Every peer and ours beside it, the epochs of all taken in turns (tools.timing.take_turns,
    the warm-up noting each one's output); `save` gets the rows after each turn, so a run cut
    short keeps the turns it finished."""
    built: list[tuple[PeerResult, Measured]] = []
    rows = []
    for row, make in lineup(data, cfg, device, folder):
        rows.append(row)
        loader = construct(row, make)
        pin_threads(args.threads)  # FFCV's Loader and airbench's torch calls may change them
        if loader is not None:
            built.append((row, loader))

    def note(row: PeerResult, images: torch.Tensor) -> None:
        row.output = describe(images)

    def scored() -> None:
        score(rows)
        save(rows)

    for row, loader in take_turns(built, args.epochs, PEER_ERRORS, note, scored):
        # after the timed epochs, which the profiler would slow
        profile_epoch(row, loader, len(row.epoch_s) + 1, log)
    save(rows)
    for r in rows:
        log(peer_line(r))
    return rows


def peer_line(r: PeerResult) -> str:
    """A row of the peers table as the section's log line, named with its output as in the
    table: ours beside airbench's loader is two rows of one loader and augmentation."""
    return (f"peers: {peer_name(r.loader, r.augment, r.output)}: "
            + (f"{r.images_per_s:,.0f} images/s" if r.status == "ok"
               else f"{r.status}, {r.reason}")
            + (f", {r.ratio:.2f}x {r.versus}" if r.ratio else "")
            + (f"; profiled epoch: most time in {r.top_op}" if r.top_op else "")
            + (f", device busy {r.device_busy_ms:.2f} ms, {r.device_events} device events"
               if r.device_busy_ms is not None else ""))


def seed_configs(args: argparse.Namespace, device: torch.device, out: str) -> list[TrainConfig]:
    """The seed notebook's pipeline and the default preset, at --peer-width over
    --peer-epoch-images."""
    images, width = args.peer_epoch_images, args.peer_width
    seed = base_config(args, device, images, out, width=width, **PRESETS["seed"], preset="seed",
                       loader="torchvision", precision="fp32", compile=False,
                       channels_last=False)
    # the default preset's own batch size, not --batch-size
    default = base_config(args, device, images, out, width=width,
                          batch_size=TrainConfig.batch_size)
    return [seed, default]


def bench_seed_epochs(args: argparse.Namespace, device: torch.device, out: str,
                      log: Log = silent) -> list[SeedEpochResult]:
    """One training epoch of the seed's pipeline beside one of the default preset, in turns."""
    configs = seed_configs(args, device, out)
    runs = [make_run(cfg, args.threads) for cfg in configs]
    first = [train_pass(run, 0) for run in runs]
    steady: list[list[Pass]] = [[] for _ in runs]
    for epoch in range(1, args.epochs + 1):
        for passes, run in zip(steady, runs, strict=True):
            passes.append(train_pass(run, epoch))
    results = []
    for name, cfg, run, warm, passes in zip(("seed", "default"), configs, runs, first, steady,
                                            strict=True):
        best = fastest(passes)
        results.append(SeedEpochResult(
            name, cfg.loader, cfg.precision, cfg.compile, cfg.channels_last,
            run.train_loader.batch_size,  # capped at the split, as in training
            cfg.width, warm.images,
            count_train_flops(run.unwrapped)[0],
            warm.seconds, [p.seconds for p in passes], best.images / best.seconds))
    for r in results:
        r.vs_seed = r.images_per_s / results[0].images_per_s
        log(f"peers: {r.pipeline} pipeline epoch {r.images_per_s:,.1f} images/s, "
            f"{r.vs_seed:.2f}x seed")
    del runs
    release()
    return results


def bench_peers(cfg: TrainConfig, device: torch.device, args: argparse.Namespace,
                out: str, save: Callable[[dict], None], log: Log = silent) -> dict:
    """The peers section: loaders beside the public peers, then seed vs default epochs (none,
    and why in `epochs_failed`, when either pipeline cannot run here); `save` gets what is
    measured so far, as the loaders' turns end."""
    data = prepare_data(cfg)
    folder = Path(out) / "airbench"
    folder.mkdir(parents=True, exist_ok=True)
    loaders = bench_peer_loaders(data, cfg, device, args, folder,
                                 lambda rows: save(dict(loaders=rows, epochs=[])), log)
    release()
    try:
        return dict(loaders=loaders, epochs=bench_seed_epochs(args, device, out, log))
    except MEASURE_ERRORS as error:
        log(f"peers: the seed vs default epochs failed: {one_line(error)}")
        release()
        return dict(loaders=loaders, epochs=[], epochs_failed=one_line(error))

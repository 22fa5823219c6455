"""`python tools/bench.py`: loader, train-step, full-epoch and MFU throughput, in one process.

Every figure of a report is measured in the same run, so ratios between them hold on a noisy,
shared machine. Training FLOPs per image are taken as 3 x 2 x forward MACs (the backward pass
costs about twice the forward; 1 MAC = 2 FLOPs); MFU is images/s x FLOPs per image over the
dense matmul peak of the step's dtype, itself timed in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from torch import nn

from engine.config import TrainConfig
from engine.model import build_model, forward_macs
from engine.train import (
    DTYPES,
    Run,
    TrainingError,
    build,
    loader_options,
    make_accelerator,
    resolve,
    train_step,
)
from loaders import LOADERS, make_loader
from loaders.base import BatchLoader, available_cores
from loaders.prepare import Prepared, prepare

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("loaders", "step", "epoch", "mfu")
TEST_IMAGES = 1_000  # size of the synthetic test split, which `build` loads but is never timed


# --- results ------------------------------------------------------------------------------


@dataclass
class Pass:
    """One timed epoch: images seen, wall seconds, and seconds blocked waiting for a batch."""

    images: int
    seconds: float
    wait_s: float = 0.0


@dataclass
class LoaderResult:
    """Throughput of one loader alone: batches made and handed over, no model."""

    loader: str
    images: int  # per epoch
    batch_size: int
    construct_s: float  # building the loader object
    first_epoch_s: float  # warm-up epoch: worker start-up, FFCV's numba JIT, page cache
    epoch_s: list[float]  # steady-state epochs after the warm-up one
    images_per_s: float  # of the fastest steady-state epoch
    vs_torchvision: float = 0.0  # images_per_s over the torchvision loader's


@dataclass
class StepResult:
    """Throughput of the engine's training step in one configuration, data already on device."""

    precision: str
    memory_format: str
    compile: bool
    batch_size: int
    width: int
    status: str = "ok"  # "skipped" when the configuration cannot run here; see reason
    reason: str = ""
    warmup_s: float | None = None  # the untimed warm-up steps, torch.compile included
    steps: int | None = None  # per timed block
    block_s: list[float] | None = None  # seconds of each timed block of `steps` steps
    images_per_s: float | None = None  # of the fastest block


@dataclass
class EpochResult:
    """Full training epochs (data + step) with one loader, and the share spent waiting for data."""

    loader: str
    precision: str
    compile: bool
    batch_size: int
    width: int
    images: int  # per epoch
    build_s: float  # engine.train.build: data, loaders, model, optimizer
    first_epoch_s: float  # warm-up epoch: JIT, torch.compile, worker start-up
    epoch_s: list[float]  # steady-state epochs
    data_wait_s: list[float]  # seconds blocked in the loader's next(), per steady-state epoch
    data_wait_share: float  # of the fastest steady-state epoch: data_wait_s / epoch_s
    images_per_s: float  # of the fastest steady-state epoch


@dataclass
class Peak:
    """A dense matmul FLOP/s measurement: the denominator of MFU."""

    dtype: str
    size: int  # n of the n x n x n matmul
    reps: int  # per timed block
    block_s: list[float]
    flops_per_s: float  # of the fastest block


@dataclass
class MfuResult:
    """FLOPs per image, the measured peaks, and the MFU of every throughput of the run."""

    macs_per_image: int  # forward multiply-accumulates (engine.model.forward_macs)
    train_flops_per_image: int  # 3 x 2 x macs_per_image
    formula: str = "train FLOPs/image = 3 (forward + 2 x backward) x 2 (FLOPs/MAC) x forward MACs"
    peaks: dict[str, Peak] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


# --- timing primitives --------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_pass(loader: BatchLoader, epoch: int) -> Pass:
    """Iterate one epoch of a loader, as a consumer that keeps every batch would."""
    loader.set_epoch(epoch)
    sync(loader.device)
    start, images = time.perf_counter(), 0
    for _, labels in loader:
        images += len(labels)
    sync(loader.device)
    return Pass(images, time.perf_counter() - start)


def train_pass(run: Run, epoch: int) -> Pass:
    """One epoch of engine.train.train_step over the run's loader, timing the waits in next()."""
    loader, device = run.train_loader, run.accelerator.device
    loader.set_epoch(epoch)
    run.model.train()
    sync(device)
    start, images, wait, batches = time.perf_counter(), 0, 0.0, iter(loader)
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - before
        if batch is None:
            break
        train_step(run, *batch)
        images += len(batch[1])
    sync(device)
    return Pass(images, time.perf_counter() - start, wait)


def timed_steps(run: Run, images: torch.Tensor, labels: torch.Tensor, n: int) -> float:
    """Seconds for n training steps on one batch already on the device."""
    device = run.accelerator.device
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        train_step(run, images, labels)
    sync(device)
    return time.perf_counter() - start


def fastest(passes: list[Pass]) -> Pass:
    """The pass least disturbed by other work on the machine."""
    return min(passes, key=lambda p: p.seconds / p.images)


def pin_threads(n: int) -> None:
    """Set torch's intra-op threads: importing or running FFCV changes them behind our back."""
    torch.set_num_threads(n)


# --- sections -----------------------------------------------------------------------------


def make_run(cfg: TrainConfig, threads: int) -> Run:
    """An engine run for cfg; accelerate's process-wide state is reset so precisions may differ."""
    AcceleratorState._reset_state()
    torch.compiler.reset()  # a fresh model must not inherit the previous one's compiled graphs
    run = build(cfg, make_accelerator(cfg))
    pin_threads(threads)
    return run


def build_loader(kind: str, data: Prepared, cfg: TrainConfig,
                 device: torch.device) -> tuple[BatchLoader, float]:
    """A training loader as engine.train.build makes it, and the seconds its construction took."""
    start = time.perf_counter()
    loader = make_loader(kind, data.train, train=True, batch_size=cfg.batch_size,
                         augment=cfg.augment(), **loader_options(cfg, data, device))
    return loader, time.perf_counter() - start


def bench_loaders(cfg: TrainConfig, device: torch.device,
                  args: argparse.Namespace) -> list[LoaderResult]:
    """Every loader over the same split and augmentations, their epochs taken in turns so that
    a burst of load on a shared machine hits all of them alike."""
    data = prepare("synthetic", Path(cfg.data_dir), tuple(cfg.synthetic_size),
                   workers=cfg.workers)
    built = {kind: build_loader(kind, data, cfg, device) for kind in LOADERS}
    pin_threads(args.threads)
    first = {kind: loader_pass(loader, 0) for kind, (loader, _) in built.items()}
    steady: dict[str, list[Pass]] = {kind: [] for kind in LOADERS}
    for epoch in range(1, args.epochs + 1):
        for kind, (loader, _) in built.items():
            steady[kind].append(loader_pass(loader, epoch))
    results = [LoaderResult(kind, first[kind].images, cfg.batch_size, built[kind][1],
                            first[kind].seconds, [p.seconds for p in steady[kind]],
                            fastest(steady[kind]).images / fastest(steady[kind]).seconds)
               for kind in LOADERS]
    baseline = next(r.images_per_s for r in results if r.loader == "torchvision")
    for r in results:
        r.vs_torchvision = r.images_per_s / baseline
        log(f"loaders: {r.loader} {r.images_per_s:,.0f} images/s")
    return results


def step_configs(base: TrainConfig, args: argparse.Namespace) -> list[TrainConfig]:
    """precision x memory format x compile at --batch-size, then the other batch sizes."""
    grid = [replace(base, precision=p, channels_last=f == "channels_last", compile=c == "on")
            for p in args.precisions for f in args.formats for c in args.compile]
    sweep_compile = base.compile and "on" in args.compile
    return grid + [replace(base, batch_size=b, compile=sweep_compile)
                   for b in args.batch_sizes if b != base.batch_size]


def bench_step(cfg: TrainConfig, args: argparse.Namespace) -> StepResult:
    """Images/s of forward + backward + optimizer step on a fixed batch already on the device."""
    result = StepResult(cfg.precision, "channels_last" if cfg.channels_last else "contiguous",
                        cfg.compile, cfg.batch_size, cfg.width)
    try:
        run = make_run(cfg, args.threads)
        images, labels = next(iter(run.train_loader))
        result.warmup_s = timed_steps(run, images, labels, args.warmup_steps)
        result.block_s = [timed_steps(run, images, labels, args.steps)
                          for _ in range(args.repeats)]
    except (TrainingError, RuntimeError) as error:  # e.g. fp16 on CPU, a failed compile, OOM
        result.status = "skipped"
        result.reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
        return result
    result.steps = args.steps
    result.images_per_s = args.steps * cfg.batch_size / min(result.block_s)
    return result


def bench_steps(base: TrainConfig, args: argparse.Namespace) -> list[StepResult]:
    """Every step configuration, one after the other, freeing each before the next."""
    results = []
    for cfg in step_configs(base, args):
        results.append(bench_step(cfg, args))
        r = results[-1]
        log(f"step: {r.precision} {r.memory_format} compile={r.compile} batch {r.batch_size}: "
            + (f"{r.images_per_s:,.1f} images/s" if r.status == "ok" else r.reason))
        release()
    return results


def bench_epoch(cfg: TrainConfig, epochs: int, threads: int) -> EpochResult:
    """Full training epochs with cfg's loader: warm-up epoch, then steady-state ones."""
    start = time.perf_counter()
    run = make_run(cfg, threads)
    build_s = time.perf_counter() - start
    first = train_pass(run, 0)
    steady = [train_pass(run, e) for e in range(1, epochs + 1)]
    best = fastest(steady)
    return EpochResult(cfg.loader, cfg.precision, cfg.compile, cfg.batch_size, cfg.width,
                       first.images, build_s, first.seconds, [p.seconds for p in steady],
                       [p.wait_s for p in steady], best.wait_s / best.seconds,
                       best.images / best.seconds)


def bench_epochs(base: TrainConfig, args: argparse.Namespace) -> list[EpochResult]:
    """A full training epoch with each loader, at the engine's defaults for the device."""
    results = []
    for kind in LOADERS:
        results.append(bench_epoch(replace(base, loader=kind), args.epochs, args.threads))
        r = results[-1]
        log(f"epoch: {kind} {r.images_per_s:,.1f} images/s, data wait {r.data_wait_share:.1%}")
        release()
    return results


def train_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Training FLOPs per image: 3 x 2 x forward MACs (backward ~ 2 x forward; 1 MAC = 2 FLOPs)."""
    return 3 * 2 * forward_macs(model, input_shape)


def mfu(images_per_s: float, flops_per_image: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak."""
    return images_per_s * flops_per_image / peak_flops_per_s


def timed_matmuls(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Seconds for reps products a @ b."""
    sync(a.device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync(a.device)
    return time.perf_counter() - start


def matmul_peak(dtype: str, device: torch.device, n: int, seconds: float, blocks: int) -> Peak:
    """Dense matmul FLOP/s of n x n x n products of `dtype`: the fastest of timed blocks."""
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    timed_matmuls(a, b, 1)  # warm-up: library load, kernel choice
    reps = max(3, int(seconds / blocks / timed_matmuls(a, b, 1)))
    block_s = [timed_matmuls(a, b, reps) for _ in range(blocks)]
    return Peak(dtype, n, reps, block_s, 2 * n**3 * reps / min(block_s))


def mfu_rows(results: dict, flops: int, peaks: dict[str, Peak]) -> list[dict]:
    """MFU of every step configuration that ran and of every steady-state training epoch."""
    rows = [dict(source="step", config=f"{r.precision} {r.memory_format} "
                 f"{'compiled' if r.compile else 'eager'} batch {r.batch_size}",
                 precision=r.precision, images_per_s=r.images_per_s)
            for r in results.get("step", []) if r.status == "ok"]
    rows += [dict(source="epoch", config=f"{r.loader} loader, {r.precision} "
                  f"{'compiled' if r.compile else 'eager'} batch {r.batch_size}",
                  precision=r.precision, images_per_s=r.images_per_s)
             for r in results.get("epoch", [])]
    for row in rows:
        peak = peaks[row["precision"]].flops_per_s
        row.update(achieved_flops_per_s=row["images_per_s"] * flops, peak_flops_per_s=peak,
                   mfu=mfu(row["images_per_s"], flops, peak))
    return rows


def bench_mfu(results: dict, base: TrainConfig, device: torch.device,
              args: argparse.Namespace) -> MfuResult:
    """Peaks of fp32 and of every precision that ran, and the MFU of every measured throughput."""
    out = MfuResult(forward_macs(build_model(base.arch, 10, base.width)),
                    train_flops(build_model(base.arch, 10, base.width)))
    dtypes = {"fp32", *(r.precision for r in results.get("step", []) if r.status == "ok"),
              *(r.precision for r in results.get("epoch", []))}
    pin_threads(args.threads)
    for dtype in sorted(dtypes):
        out.peaks[dtype] = matmul_peak(dtype, device, args.matmul_size, args.matmul_seconds,
                                       args.repeats)
        log(f"mfu: {dtype} matmul peak {out.peaks[dtype].flops_per_s / 1e12:.3f} TFLOP/s")
    out.rows = mfu_rows(results, out.train_flops_per_image, out.peaks)
    return out


# --- metadata and output ------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stdout, flushed so a redirected log is complete at every moment."""
    print(message, flush=True)


def release() -> None:
    """Return the memory of the previous configuration before the next one is built."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def commit() -> str:
    """HEAD's hash, with '-dirty' when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = [line.split(":", 1)[1].strip() for line in
             Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    model = names[0] if names else platform.processor() or platform.machine()
    return f"cpu ({model}, {available_cores()} cores)"


def metadata(device: torch.device, argv: list[str]) -> dict:
    """What ran where: device, library versions, commit, command line and date."""
    return dict(
        command=shlex.join(["python", "tools/bench.py", *argv]), argv=argv, commit=commit(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device.type, device_name=device_name(device), cores=available_cores(),
        torch=str(torch.__version__),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch_cuda_build=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        accelerate=version("accelerate"), ffcv=version("ffcv"),  # ffcv.__version__ is stale
        python=platform.python_version())


def number(value) -> str:
    """A cell of a table: thousands separators for large numbers, 3 significant digits else."""
    if isinstance(value, list):
        return " ".join(number(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def table(title: str, rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of the given keys of rows."""
    cells = [columns] + [[number(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([f"\n== {title}", *lines])


COLUMNS = {
    "loaders": ["loader", "images", "batch_size", "construct_s", "first_epoch_s", "epoch_s",
                "images_per_s", "vs_torchvision"],
    "step": ["precision", "memory_format", "compile", "batch_size", "width", "status",
             "warmup_s", "steps", "block_s", "images_per_s", "reason"],
    "epoch": ["loader", "precision", "compile", "batch_size", "images", "build_s",
              "first_epoch_s", "epoch_s", "data_wait_share", "images_per_s"],
    "mfu": ["source", "config", "images_per_s", "achieved_TFLOP/s", "peak_TFLOP/s", "mfu"],
}


def report(results: dict) -> str:
    """Every section as a table, the peaks and the MFU formula under the MFU table."""
    parts = [table(name, [asdict(r) for r in results[name]], COLUMNS[name])
             for name in ("loaders", "step", "epoch") if name in results]
    if "mfu" in results:
        m = results["mfu"]
        rows = [{**r, "achieved_TFLOP/s": r["achieved_flops_per_s"] / 1e12,
                 "peak_TFLOP/s": r["peak_flops_per_s"] / 1e12} for r in m.rows]
        parts.append(table("mfu", rows, COLUMNS["mfu"]))
        parts.append(f"{m.formula}; forward {m.macs_per_image:,} MACs -> "
                     f"{m.train_flops_per_image:,} training FLOPs per image")
        parts += [f"{p.dtype} peak: {p.flops_per_s / 1e12:.3f} TFLOP/s ({p.size}^3 matmul, "
                  f"fastest of {len(p.block_s)} blocks of {p.reps})" for p in m.peaks.values()]
    return "\n".join(parts)


# --- command line -------------------------------------------------------------------------


def csv(kind):
    """An argparse type: comma-separated values of `kind`."""
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; options left out stay None until fill_defaults."""
    p = argparse.ArgumentParser(prog="python tools/bench.py", description=__doc__.splitlines()[0],
                                epilog="Options left out take device-dependent defaults, "
                                       "smaller with --quick.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--sections", type=csv(str), default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--json", type=Path, help="also write every figure and the metadata here")
    p.add_argument("--quick", action="store_true",
                   help="small images counts and width 16, no compile: about a minute on 2 cores")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="where the synthetic data and its .beton files are kept (default: ./data)")
    p.add_argument("--images", type=int, help="training images of the loaders section "
                   "(default 50000, quick 2048)")
    p.add_argument("--epoch-images", type=int, help="training images of the epoch section "
                   "(default: 50000 on CUDA, 2560 on CPU, quick 256)")
    p.add_argument("--epochs", type=int, help="steady-state epochs after the warm-up one "
                   "(default 2, quick 1)")
    p.add_argument("--width", type=int, help="ResNet-18 width (default 64, quick 16)")
    p.add_argument("--batch-size", type=int,
                   help="batch size of every section (default: 512 on CUDA, 256 on CPU, quick 64)")
    p.add_argument("--batch-sizes", type=csv(int), help="more batch sizes for the step section, "
                   "at the engine's defaults (default: 256,1024 on CUDA, 128,512 on CPU, "
                   "quick 32)")
    p.add_argument("--precisions", type=csv(str), default=["fp32", "bf16", "fp16"],
                   help="step section precisions (default: fp32,bf16,fp16)")
    p.add_argument("--formats", type=csv(str), default=["channels_last", "contiguous"],
                   help="step section memory formats (default: channels_last,contiguous)")
    p.add_argument("--compile", type=csv(str),
                   help="step section torch.compile settings (default: off,on; quick: off)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3, quick 1)")
    p.add_argument("--steps", type=int, help="timed steps per block (default: 20 on CUDA, 3 on "
                   "CPU, quick 2)")
    p.add_argument("--repeats", type=int, help="timed blocks of steps and of matmuls; the fastest "
                   "counts (default 3, quick 1)")
    p.add_argument("--matmul-size", type=int,
                   help="n of the peak n x n matmul (default: 4096 on CUDA, 2048 on CPU, "
                        "quick 1024)")
    p.add_argument("--matmul-seconds", type=float,
                   help="time spent on each peak measurement (default 1, quick 0.3)")
    p.add_argument("--workers", type=int, help="loader workers (default: cores available)")
    p.add_argument("--threads", type=int, default=available_cores(),
                   help="torch intra-op threads for the step, epoch and mfu sections "
                        "(default: cores available)")
    args = p.parse_args(argv)
    problems = [s for s in args.sections if s not in SECTIONS]
    problems += [x for x in args.precisions if x not in DTYPES]
    problems += [x for x in args.formats if x not in ("channels_last", "contiguous")]
    problems += [x for x in args.compile or [] if x not in ("off", "on")]
    if problems:
        p.error(f"unknown value(s) {', '.join(problems)}; see --help")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    """Give the options left out their values for this device and mode."""
    cuda = args.device == "cuda"
    defaults = dict(images=50_000, epoch_images=50_000 if cuda else 2_560, epochs=2, width=64,
                    batch_size=512 if cuda else 256, compile=["off", "on"],
                    batch_sizes=[256, 1024] if cuda else [128, 512], steps=20 if cuda else 3,
                    warmup_steps=3, repeats=3, matmul_seconds=1.0,
                    matmul_size=4096 if cuda else 2048)
    if args.quick:
        defaults.update(images=2_048, epoch_images=256, epochs=1, width=16, batch_size=64,
                        batch_sizes=[32], compile=["off"], warmup_steps=1, steps=2, repeats=1,
                        matmul_size=1024, matmul_seconds=0.3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def pick_device(args: argparse.Namespace) -> torch.device:
    """The device to measure; for cpu, GPUs are hidden so the engine's accelerator uses none."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch about CUDA
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def base_config(args: argparse.Namespace, device: torch.device, images: int,
                out: str) -> TrainConfig:
    """The engine's config (fast preset, device defaults) on synthetic data of `images` images."""
    cfg = TrainConfig(dataset="synthetic", data_dir=str(args.data_dir),
                      synthetic_size=(images, TEST_IMAGES), width=args.width,
                      batch_size=args.batch_size, workers=args.workers, out=out)
    resolve(cfg, device.type == "cuda")
    return cfg


def run_sections(args: argparse.Namespace, device: torch.device,
                 out: str) -> tuple[dict, dict[str, float]]:
    """The chosen sections, always in the order loaders, step, epoch, mfu, and their seconds."""
    base = base_config(args, device, args.images, out)
    results: dict = {}
    jobs = {
        "loaders": lambda: bench_loaders(base, device, args),
        "step": lambda: bench_steps(replace(base, loader="resident"), args),
        "epoch": lambda: bench_epochs(base_config(args, device, args.epoch_images, out), args),
        "mfu": lambda: bench_mfu(results, base, device, args),
    }
    seconds = {}
    for name in (s for s in SECTIONS if s in args.sections):
        start = time.perf_counter()
        results[name] = jobs[name]()
        seconds[name] = time.perf_counter() - start
        log(f"{name} section: {seconds[name]:.0f} s")
    return results, seconds


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen sections, print the tables and write --json."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = pick_device(args)
    fill_defaults(args)
    meta = metadata(device, argv)
    for key in ("command", "commit", "date", "device_name", "torch", "cuda"):
        log(f"{key}: {meta[key]}")
    log(f"options: {vars(args)}")
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        results, meta["section_s"] = run_sections(args, device, out)
    log(report(results))
    if args.json:
        payload = dict(meta=meta, options={k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()},
                       **{k: asdict(v) if k == "mfu" else [asdict(r) for r in v]
                          for k, v in results.items()})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

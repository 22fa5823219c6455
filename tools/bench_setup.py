"""What every tools/bench.py section builds its measurements from: the engine's config on a
synthetic split, a fresh run or a loader of it, and the memory released between them."""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from common.errors import EngineError
from common.hardware import native_bf16
from common.stop_signals import stop_if_interrupted
from engine.config import TrainConfig, resolve
from engine.launch import make_accelerator
from engine.run import Run, build, loader_options, make_train_loader
from loaders.base import BatchLoader
from loaders.preparation import Prepared
from tools.bench_options import TEST_IMAGES
from tools.timing import sync

# what a configuration that cannot run here raises: fp16 on CPU, a failed compile, a loader's
# error, out of memory, any CUDA error; it is recorded in its row and the others go on
MEASURE_ERRORS = (EngineError, RuntimeError)


def base_config(args: argparse.Namespace, device: torch.device, images: int, out: str,
                **given: Any) -> TrainConfig:
    """The engine's config (fast preset, device defaults) on synthetic data of `images` images,
    at --width and --batch-size unless `given` (TrainConfig's fields) says otherwise; with
    --quick never compiled, as on the CPU (the engine compiles by default on CUDA)."""
    cfg = TrainConfig(**{**dict(dataset="synthetic", data_dir=str(args.data_dir),
                                synthetic_size=(images, TEST_IMAGES), width=args.width,
                                batch_size=args.batch_size, workers=args.workers, out=out,
                                compile=False if args.quick else None), **given})
    return resolve(cfg, device.type == "cuda", bf16=native_bf16())


def release() -> None:
    """Return the memory of the previous configuration before the next one is built."""
    gc.collect()
    stop_if_interrupted()  # a Ctrl-C landing in a finalizer that the collection ran is lost there
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def pin_threads(n: int) -> None:
    """Set torch's intra-op threads: importing or running FFCV changes them behind our back."""
    torch.set_num_threads(n)


def make_run(cfg: TrainConfig, threads: int) -> Run:
    """An engine run for cfg (a fresh model: no compiled graphs of the previous one)."""
    torch.compiler.reset()  # a fresh model must not inherit the previous one's compiled graphs
    run = build(cfg, make_accelerator(cfg))
    pin_threads(threads)
    return run


def build_loader(kind: str, data: Prepared, cfg: TrainConfig,
                 device: torch.device) -> tuple[BatchLoader, float]:
    """A training loader as engine.run.build makes it, and the seconds its construction took."""
    start = time.perf_counter()
    loader = make_train_loader(kind, cfg, data, loader_options(cfg, data, device))
    sync(device)  # resident queues the normalization of the whole split on the GPU
    return loader, time.perf_counter() - start

"""A bench run: the device measured, the chosen sections in order, their progress logged and
--json rewritten after each (tools/bench.py is its command line, which prints the tables)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.atomic import write_json
from common.compile_modes import GRAPH_MODES
from common.streams import Log
from engine.config import TrainConfig
from tools.bench_mfu import bench_mfu
from tools.bench_options import SECTIONS, fill_defaults
from tools.bench_output import metadata
from tools.bench_peers import bench_peers
from tools.bench_profile import bench_profile
from tools.bench_sections import bench_epochs, bench_loaders, bench_steps
from tools.bench_setup import base_config
from tools.options import pick_device


def settle_device(args: argparse.Namespace) -> torch.device:
    """The device to measure, settled for the whole process: for cpu the GPUs are hidden
    (CUDA_VISIBLE_DEVICES) so the engine's accelerator uses none, and args.device becomes the
    device's type (None: cuda when available), which fill_defaults and the sections read."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch about CUDA
    device = pick_device(args.device)
    args.device = device.type
    return device


def profiled_config(args: argparse.Namespace, device: torch.device, out: str) -> TrainConfig:
    """The profile section's run: the epoch section's defaults, fed by --profile-loader, and
    compiled in torch.compile's default mode where those replay CUDA graphs: kineto's
    maintainers track the profiles of CUDA graphs as incorrect, through CUPTI
    (pytorch/kineto#1165, open; a fix may have come with CUDA 13.1's CUPTI, and the GPU
    machine's torch is built for 13.0), where the default mode's profile worked on the first
    H200 run. The kernels are the same; the epoch section times the graphs."""
    cfg = base_config(args, device, args.epoch_images, out)
    mode = "default" if cfg.compile_mode in GRAPH_MODES else cfg.compile_mode
    return replace(cfg, loader=args.profile_loader or cfg.loader, compile_mode=mode)


def trace_path(args: argparse.Namespace) -> Path | None:
    """Where the profile section writes its trace: --trace, else beside --json, else nowhere."""
    if args.trace is not None:
        return args.trace
    return args.json.with_suffix(".trace.json.gz") if args.json is not None else None


def run_sections(args: argparse.Namespace, device: torch.device, out: str,
                 done: Callable[[dict, dict[str, float]], None], log: Log) -> dict:
    """The chosen sections' results, always in the order of SECTIONS; `done` gets them and
    the seconds of each section after each section."""
    base = base_config(args, device, args.images, out)
    results: dict = {}
    jobs = {
        "loaders": lambda: bench_loaders(base, device, args, log),
        "peers": lambda: bench_peers(base, device, args, out, partial("peers"), log),
        "step": lambda: bench_steps(replace(base, loader="resident"), args, partial("step"),
                                    log),
        "epoch": lambda: bench_epochs(base_config(args, device, args.epoch_images, out), args,
                                      partial("epoch"), log),
        "mfu": lambda: bench_mfu(results, base, device, args, log),
        "profile": lambda: bench_profile(profiled_config(args, device, out), args,
                                         trace_path(args), log),
    }
    seconds: dict[str, float] = {}

    def partial(name: str) -> Callable[[Any], None]:
        """A section's rows so far, saved as a section still running (not in `seconds`)."""
        return lambda rows: done({**results, name: rows}, seconds)

    for name in (s for s in SECTIONS if s in args.sections):
        start = time.perf_counter()
        results[name] = jobs[name]()
        seconds[name] = time.perf_counter() - start
        done(results, seconds)
        log(f"{name} section: {seconds[name]:.0f} s")
    return results


def serializable(result: Any) -> Any:
    """A section's result as JSON-ready lists and dicts (dataclasses, lists and dicts of them,
    and plain values such as a failure's reason)."""
    if isinstance(result, list):
        return [serializable(r) for r in result]
    if isinstance(result, dict):
        return {k: serializable(v) for k, v in result.items()}
    return asdict(result) if is_dataclass(result) else result


def failed(results: Any) -> int:
    """How many rows of the results failed (status "failed", and the peers' seed vs default
    epochs when they failed; "skipped" and "not installed" rows are what this machine cannot
    run, not failures)."""
    if isinstance(results, dict):
        return (int(results.get("status") == "failed") + int("epochs_failed" in results)
                + sum(map(failed, results.values())))
    return sum(map(failed, results)) if isinstance(results, list) else 0


def run_bench(args: argparse.Namespace, argv: list[str], log: Log) -> dict:
    """Measure the sections args names, logging where it runs and its progress, and write
    --json; the sections' results (tools.bench_output.report makes their tables)."""
    device = settle_device(args)
    fill_defaults(args)
    meta = metadata(device, argv)
    for key in ("command", "commit", "date", "device_name", "load_average", "torch", "cuda"):
        log(f"{key}: {meta[key]}")
    log(f"options: {vars(args)}")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def save(results: dict, seconds: dict[str, float]) -> None:
        """--json as it stands: rewritten after each section, so a run cut short (a
        time limit, Ctrl-C) keeps what it measured; `complete` says whether it was."""
        if args.json:
            meta.update(section_s=seconds, complete=seconds.keys() == set(args.sections))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, dict(meta=meta, options=options,
                                       **{k: serializable(v) for k, v in results.items()}))

    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        return run_sections(args, device, out, save, log)

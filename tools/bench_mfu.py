"""The MFU section of tools/bench.py: training FLOPs per image counted on the model (by
torch.utils.flop_counter.FlopCounterMode over a real forward and backward pass, so MFU rests on
what runs rather than on a hand count, which is kept to cross-check it), dense matmul peaks
measured in the same run, and the MFU of every throughput the other sections measured."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.errors import SetupError
from common.streams import Log, silent
from engine.config import TrainConfig
from engine.failures import out_of_memory_as
from engine.model import build_model, forward_macs
from tools.bench_names import epoch_name, step_name
from tools.bench_setup import pin_threads
from tools.timing import Peak, matmul_peak

PROBE_IMAGES = 2  # images of the counted batch: FLOPs scale linearly with it


def count_train_flops(model: nn.Module) -> tuple[int, dict[str, int]]:
    """FLOPs per 3 x 32 x 32 image of one forward + backward (loss included) in training mode,
    in total and per top-level module; counted on a CPU copy so the model's weights, statistics
    and gradients are untouched. Counted from shapes: the memory format changes none."""
    probe = copy.deepcopy(model).float().cpu().train()
    x = torch.randn(PROBE_IMAGES, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = probe(x)
        F.cross_entropy(logits, torch.zeros(PROBE_IMAGES, dtype=torch.long)).backward()
    by_module = {name: sum(counts.values()) // PROBE_IMAGES
                 for name, counts in counter.get_flop_counts().items() if name.count(".") == 1}
    return counter.get_total_flops() // PROBE_IMAGES, by_module


@dataclass
class MfuResult:
    """FLOPs per image, the measured peaks, and the MFU of every throughput of the run."""

    train_flops_per_image: int  # counted by count_train_flops, forward + backward
    flops_by_module: dict[str, int]  # the same count per top-level module
    macs_per_image: int  # forward multiply-accumulates (engine.model.forward_macs)
    hand_count_flops_per_image: int  # 3 x 2 x macs_per_image: the cross-check
    formula: str = ("train FLOPs/image counted by torch.utils.flop_counter.FlopCounterMode over "
                    "a forward and backward pass (cross-check: 3 x 2 x forward MACs)")
    peaks: dict[str, Peak] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    not_peaks: list[str] = field(default_factory=list)  # dtypes whose matmul a run outpaced


def hand_train_flops(macs: int) -> int:
    """The hand count kept to cross-check the counted FLOPs: 3 x 2 x an image's forward MACs
    (backward ~ 2 x forward; 1 MAC = 2 FLOPs)."""
    return 3 * 2 * macs


def mfu(images_per_s: float, flops_per_image: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak."""
    return images_per_s * flops_per_image / peak_flops_per_s


def throughputs(results: dict) -> list[dict]:
    """Every throughput the other sections measured, a row each (source, config, precision,
    images_per_s, and a peer epoch's own FLOPs): the step configurations and training epochs
    that ran, and the peers' timed epochs."""
    rows = [dict(source="step", config=step_name(r.precision, r.memory_format, r.compile,
                                                 r.compile_mode, r.batch_size),
                 precision=r.precision, images_per_s=r.images_per_s)
            for r in results.get("step", []) if r.status == "ok"]
    rows += [dict(source="epoch", config=epoch_name(r.loader, r.precision, r.compile,
                                                    r.compile_mode, r.batch_size,
                                                    cudnn_benchmark=r.cudnn_benchmark),
                  precision=r.precision, images_per_s=r.images_per_s)
             for r in results.get("epoch", []) if r.status == "ok"]
    # the peers' timed training epochs, each with the FLOPs counted on its own model
    rows += [dict(source="peers", config=f"{r.pipeline} pipeline, {r.loader} loader, "
                  f"{r.precision} width {r.width} batch {r.batch_size}", precision=r.precision,
                  images_per_s=r.images_per_s, flops=r.train_flops_per_image)
             for r in results.get("peers", {}).get("epochs", [])]
    return rows


def mfu_rows(results: dict, flops: int,
             peaks: dict[str, Peak]) -> tuple[list[dict], list[str]]:
    """MFU of every throughput (throughputs), and the precisions whose peak a run outpaced
    (their rows get no MFU: outpaced_peaks)."""
    rows = throughputs(results)
    for row in rows:
        peak, per_image = peaks[row["precision"]].flops_per_s, row.pop("flops", flops)
        row.update(achieved_flops_per_s=row["images_per_s"] * per_image, peak_flops_per_s=peak,
                   mfu=mfu(row["images_per_s"], per_image, peak))
    outpaced = outpaced_peaks(rows)
    for row in rows:  # an MFU over 100% would only say the peak is wrong: none at all
        if row["precision"] in outpaced:
            row["mfu"] = None
    return rows, outpaced


def outpaced_peaks(rows: list[dict]) -> list[str]:
    """The precisions a run computed faster than their matmul peak: that matmul is then not the
    device's fastest path (torch's bf16 matmul on a CPU without bf16 instructions is far slower
    than oneDNN's bf16 convolutions), and no MFU of that precision means anything."""
    return sorted({row["precision"] for row in rows
                   if row["achieved_flops_per_s"] > row["peak_flops_per_s"]})


def bench_mfu(results: dict, base: TrainConfig, device: torch.device,
              args: argparse.Namespace, log: Log = silent) -> MfuResult:
    """Peaks of fp32 and of every precision that ran, and the MFU of every measured throughput.
    SetupError naming the option when the model or a matmul does not fit in memory."""
    with out_of_memory_as(SetupError(f"out of memory counting the FLOPs of the model at "
                                      f"--width {base.width}; choose a smaller --width.")):
        model = build_model(base.arch, 10, base.width)
        counted, by_module = count_train_flops(model)
    macs = forward_macs(model)
    out = MfuResult(counted, by_module, macs, hand_train_flops(macs))
    dtypes = {"fp32", *(row["precision"] for row in throughputs(results))}
    pin_threads(args.threads)
    for dtype in sorted(dtypes):
        with out_of_memory_as(SetupError(f"out of memory for the {dtype} matmul peak at "
                                          f"--matmul-size {args.matmul_size}; choose a "
                                          "smaller --matmul-size.")):
            out.peaks[dtype] = matmul_peak(dtype, device, args.matmul_size, args.matmul_seconds,
                                           args.repeats)
        log(f"mfu: {dtype} matmul peak {out.peaks[dtype].flops_per_s / 1e12:.3f} TFLOP/s "
            f"({out.peaks[dtype].math})")
    out.rows, out.not_peaks = mfu_rows(results, out.train_flops_per_image, out.peaks)
    return out

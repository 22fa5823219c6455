"""The names of the bench's step, epoch and peers rows, without importing torch, so tools that only
read results (tools/gpu_summary.py) label rows exactly as the bench does; and how a row's loader
overhead is said."""

from __future__ import annotations

from common.compile_modes import compile_text


def overhead_text(share: float) -> str:
    """An epoch row's loader overhead (1 - steps on one batch / the epoch) as a percentage; below
    zero the steps alone ran slower than the whole epoch, which only a change in the machine's
    load between the two timings does: said so, not left to read as a loader that saves time."""
    return f"{share:.1%}" + (" (noise: the machine's load changed between the timings)"
                             if share < 0 else "")


def step_name(precision: str, memory_format: str, compile: bool, mode: str,
              batch_size: int) -> str:
    """A step section row's name: 'bf16 channels_last compiled batch 512'."""
    return f"{precision} {memory_format} {compile_text(compile, mode)} batch {batch_size}"


def epoch_name(loader: str, precision: str, compile: bool, mode: str, batch_size: int, *,
               cudnn_benchmark: bool = True) -> str:
    """An epoch section row's name, or the profile's: 'resident loader, bf16 compiled batch
    512' (and ', no cuDNN autotuning' where cuDNN did not time its algorithms)."""
    # the engine's runs autotune (TrainConfig.autotunes): only a row that did not says so
    return (f"{loader} loader, {precision} {compile_text(compile, mode)} batch {batch_size}"
            + ("" if cudnn_benchmark else ", no cuDNN autotuning"))


def peer_name(loader: str, augment: str, output: str) -> str:
    """A peers section row's name: 'resident (flip, translate 2 reflect; float16 3x32x32
    channels_last)'. The output tells apart the rows of one loader set beside one peer (ours
    in airbench's fp16, then in the training dtype); it is empty for a row that never ran."""
    return f"{loader} ({'; '.join(filter(None, (augment, output)))})"

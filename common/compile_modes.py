"""torch.compile's modes, and how a run names them and its cuDNN autotuning, and the names of the
bench's step and epoch rows: without importing torch, so tools that only read results
(tools/gpu_summary.py) label rows exactly as the engine and the bench do."""

from __future__ import annotations

# torch.compile's modes: reduce-overhead replays CUDA graphs (one launch a graph instead of one
# a kernel); the max-autotune ones also time kernel choices while compiling (minutes)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_text(compile: bool, mode: str = "default") -> str:
    """How a step runs, for logs and tables: 'eager', 'compiled' or 'compiled reduce-overhead'."""
    return ("compiled" if mode == "default" else f"compiled {mode}") if compile else "eager"


def autotune_text(cudnn_benchmark: bool) -> str:
    """What a row's name adds when cuDNN picked its algorithms untimed: '' or ', no cuDNN
    autotuning' (the engine's runs autotune; see TrainConfig.autotunes)."""
    return "" if cudnn_benchmark else ", no cuDNN autotuning"


def step_name(precision: str, memory_format: str, compile: bool, mode: str,
              batch_size: int) -> str:
    """A step section row's name: 'bf16 channels_last compiled batch 512'."""
    return f"{precision} {memory_format} {compile_text(compile, mode)} batch {batch_size}"


def epoch_name(loader: str, precision: str, compile: bool, mode: str, batch_size: int,
               cudnn_benchmark: bool) -> str:
    """An epoch section row's name: 'resident loader, bf16 compiled batch 512' (and ', no cuDNN
    autotuning' where cuDNN did not time its algorithms)."""
    return (f"{loader} loader, {precision} {compile_text(compile, mode)} batch {batch_size}"
            f"{autotune_text(cudnn_benchmark)}")

"""torch.compile's modes and how a run names them, without importing torch, so tools that only
read results (tools/gpu_summary.py) label rows exactly as the engine and the bench do."""

from __future__ import annotations

# torch.compile's modes: reduce-overhead replays CUDA graphs (one launch a graph instead of one
# a kernel); the max-autotune ones also time kernel choices while compiling (minutes)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # those that replay CUDA graphs


def compile_text(compile: bool, mode: str = "default") -> str:
    """How a step runs, for logs and tables: 'eager', 'compiled' or 'compiled reduce-overhead'."""
    return ("compiled" if mode == "default" else f"compiled {mode}") if compile else "eager"

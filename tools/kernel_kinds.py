"""A CUDA profile's kernel time by kind (convolution forward and gradients, inductor's fused
Triton kernels, cuDNN's layout kernels, ...), from the kernels' own names: under CUDA graphs
(torch.compile's `reduce-overhead`, the engine's default on one GPU) a replayed kernel has no
op of its own, and an op table credits them all to the op that launched the graph. The first
H200 run's kinds were summed by hand, by the launching op
(benchmarks/results/h200-2026-12-04/trace-kernel-kinds.log); a test checks these sums match."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# (kind, pattern searched in the lower-cased kernel name); the first match wins, so the order
# matters: cuDNN's workspace kernel of a weight gradient is a helper, a convolution's name holds
# "implicit_gemm" and is no matrix multiply, a Triton kernel fusing a BatchNorm is Triton's
KINDS = (
    ("Triton reductions", r"^triton_(red|per)_"),  # inductor's: BatchNorm statistics, gradients
    ("Triton pointwise", r"^triton_poi_"),  # inductor's fusions: BatchNorm, ReLU, add, casts
    ("Triton templates", r"^triton_tem_"),  # max-autotune's convolutions and matmuls
    ("cuDNN layout and workspace",
     r"addpadding|nhwctonchw|nchwtonhwc|init_device_workspace|precompute_indices|cudnn.*splitk"),
    ("convolution weight gradient", r"wgrad"),
    ("convolution input gradient", r"dgrad"),
    ("convolution forward", r"fprop|convolve"),
    ("matrix multiply", r"gemm|cublas"),  # the classifier; a 1x1 shortcut as a GEMM
    ("BatchNorm (eager)", r"batch_?norm|bn_fw|bn_bw"),  # cuDNN's or ATen's, uncompiled
    ("optimizer step", r"multi_tensor_apply|fused_sgd|fused_adam"),  # fused or foreach
    ("copies and fills", r"^memcpy|^memset"),
)
OTHER = "other"  # ATen's eager kernels: loss, accuracy, casts, the loader's augmentation
_PATTERNS = [(kind, re.compile(pattern)) for kind, pattern in KINDS]


def kind_of(name: str) -> str:
    """The kind of a kernel, copy or fill, by its name (OTHER where no pattern matches)."""
    lower = name.lower()
    return next((kind for kind, pattern in _PATTERNS if pattern.search(lower)), OTHER)


def kernel_kinds(kernels: Iterable[tuple[str, float]], steps: int) -> list[dict]:
    """Rows of (kind, kernels per step, milliseconds per step, share of the kernels' summed
    time), the most time first, from (name, microseconds) of every kernel of `steps` steps.
    Summed, not covered: kernels that overlap both count (the busy time counts them once)."""
    total, count = Counter(), Counter()
    for name, us in kernels:
        kind = kind_of(name)
        total[kind] += us
        count[kind] += 1
    whole = sum(total.values())
    return [dict(kind=kind, kernels=count[kind] / steps, ms=us / steps / 1e3, share=us / whole)
            for kind, us in total.most_common()]

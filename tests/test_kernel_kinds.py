"""tools/kernel_kinds.py: a CUDA profile's kernel time by kind, read from the kernels' names,
on the first H200 run's own trace (committed) and on names of each kind."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import ROOT

from tools import bench_output
from tools.bench_profile import ProfileResult
from tools.kernel_kinds import OTHER, kernel_kinds, kind_of

H200 = ROOT / "benchmarks/results/h200-2026-12-04"
STEPS = 20  # that profile's steps (run1/bench-epoch.json: profile.steps)
CONVOLUTION = ("convolution forward", "convolution input gradient",
               "convolution weight gradient", "cuDNN layout and workspace")


def h200_kernels() -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel, copy and fill in the H200 run's profile trace."""
    with gzip.open(H200 / "run1/bench-epoch.trace.json.gz") as trace:
        events = json.load(trace)["traceEvents"]
    return [(e["name"], e["dur"]) for e in events
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def test_the_h200_profile_by_kind_matches_its_count_by_hand():
    """trace-kernel-kinds.log summed the same trace by the op that launched each kernel: 6.44 ms
    of kernels per step, the two convolution ops 2.701 + 1.356 ms in 72 + 28 kernels, Triton's
    pointwise kernels 1.323 ms (101), its reductions 0.865 + 0.061 ms (83 + 32). By name alone,
    the same sums."""
    ranked = kernel_kinds(h200_kernels(), STEPS)
    rows = {row["kind"]: row for row in ranked}
    assert sum(rows[kind]["ms"] for kind in CONVOLUTION) == pytest.approx(2.701 + 1.356,
                                                                           abs=2e-3)
    assert sum(rows[kind]["kernels"] for kind in CONVOLUTION) == 72 + 28
    assert (rows["Triton pointwise"]["ms"], rows["Triton pointwise"]["kernels"]) == (
        pytest.approx(1.323, abs=1e-3), 101)
    assert (rows["Triton reductions"]["ms"], rows["Triton reductions"]["kernels"]) == (
        pytest.approx(0.865 + 0.061, abs=2e-3), 83 + 32)
    kernels = sum(row["ms"] for kind, row in rows.items() if kind != "copies and fills")
    assert kernels == pytest.approx(6.44, abs=5e-3)
    assert rows["copies and fills"]["kernels"] == 30  # the trace's 600 memsets over 20 steps
    assert sum(row["share"] for row in rows.values()) == pytest.approx(1)
    # the most time first; what is left unnamed is little
    assert [row["ms"] for row in ranked] == sorted((row["ms"] for row in ranked), reverse=True)
    assert rows[OTHER]["share"] < 0.02


@pytest.mark.parametrize("name, kind", [
    # a weight gradient's workspace kernel is cuDNN's helper, not the gradient itself
    ("void cask_plugin__5x_cudnn::xmma__5x_cudnn::init_device_workspace_kernel<xmma__5x_cudnn::"
     "implicit_gemm::wgrad_indexed::Warp_specialized_params<>>", "cuDNN layout and workspace"),
    ("void nhwcAddPaddingKernel<__nv_bfloat16, __nv_bfloat16, float, true>",
     "cuDNN layout and workspace"),
    # a convolution computed as an implicit GEMM is a convolution
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32",
     "convolution forward"),
    ("sm90_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
     "convolution input gradient"),
    ("_ZN17cutlass__5x_cudnn6KernelINS_4conv6kernel23ImplicitGemmConvolutionINS1_11threadblock"
     "22ImplicitGemmMultistageINS_4gemm9GemmShapeILi64ELi64ELi64EEENS4_52Conv2dWgradOutput",
     "convolution weight gradient"),
    ("void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6, 7, 3, 3, 5, 1, false>",
     "convolution forward"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn>",
     "matrix multiply"),
    # cuBLAS's split-K reduction of the classifier's matmul (in that trace): no "gemm" in its name
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, "
     "false, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16, true, false, false, false>",
     "matrix multiply"),
    # Triton's fusion of a BatchNorm is Triton's, the eager BatchNorm cuDNN's or ATen's
    ("triton_poi_fused__native_batch_norm_legit_functional_relu_4", "Triton pointwise"),
    ("triton_per_fused__native_batch_norm_legit_functional_copy__10", "Triton reductions"),
    ("triton_tem_fused_convolution_0", "Triton templates"),
    ("void cudnn::bn_fw_tr_1C11_singleread_specialized<__nv_bfloat16, float>",
     "BatchNorm (eager)"),
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel<float>",
     "BatchNorm (eager)"),
    # the patterns' other forms (names of these forms, not from a committed trace): a bn_bw
    # backward, and batchnorm without an underscore
    ("void cudnn::bn_bw_1C11_singleread_specialized<__nv_bfloat16, float>", "BatchNorm (eager)"),
    ("void batchnorm_bwtr_nhwc_semiPersist<__nv_bfloat16, float, 512, true, false, true>",
     "BatchNorm (eager)"),
    ("void at::native::multi_tensor_apply_kernel<FusedSgdMathFunctor<float, 2>>",
     "optimizer step"),
    # a fused step's own kernel, outside multi_tensor_apply (names of this form, not from a
    # committed trace): SGD's and Adam's each an optimizer step
    ("void at::native::fused_sgd_kernel<float, float>", "optimizer step"),
    ("void at::native::fused_adam_kernel<float, float>", "optimizer step"),
    ("Memcpy HtoD (Pinned -> Device)", "copies and fills"),
    ("Memset (Device)", "copies and fills"),
    ("void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>", OTHER),
])
def test_a_kernel_is_of_the_first_kind_its_name_matches(name, kind):
    assert kind_of(name) == kind


def test_the_profile_table_lists_the_kinds_after_the_busy_time():
    """The log gives the kinds as a table of their own; a CPU profile has none, and no table."""
    rows = kernel_kinds([("triton_poi_fused_relu_0", 30.0), ("sm90_xmma_wgrad_x", 90.0)], 2)
    profile = ProfileResult("resident", "bf16", True, 512, 64, 3, 2, "self_device_ms", "", [],
                            "reduce-overhead", device_busy_ms=0.06, step_ms=0.07,
                            device_busy_share=0.06 / 0.07, kernel_kinds=rows)
    lines = bench_output.report({"profile": profile}).splitlines()
    at = lines.index("== profile: kernels by kind (by their names), per step")
    assert lines[at - 2].startswith("device busy 0.06 ms per step")  # a blank line between
    assert lines[at + 1].split() == ["kind", "kernels", "ms", "share"]
    assert lines[at + 2].split() == ["convolution", "weight", "gradient", "0.5", "0.045", "0.75"]
    assert lines[at + 3].split() == ["Triton", "pointwise", "0.5", "0.015", "0.25"]
    cpu = ProfileResult("ffcv", "fp32", False, 64, 16, 1, 2, "self_cpu_ms", "", [])
    assert "kernels by kind" not in bench_output.report({"profile": cpu})

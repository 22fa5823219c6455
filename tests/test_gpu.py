"""The engine on a CUDA GPU: loaders, augmentation, the training step in every precision,
engine/train.py end to end with resume and out-of-memory, and the tools as subprocesses.

Every test is marked `gpu`; conftest skips them where torch sees no CUDA device.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SYNTHETIC_SIZE,
    check_the_lineup,
    interrupt_after_first_epoch,
    run_script,
)
from torch._dynamo.utils import counters

import loaders
from common.hardware import native_bf16
from engine import checkpoint
from engine.config import TrainConfig, resolve
from engine.evaluate import evaluate, logits_of
from engine.failures import out_of_memory
from engine.history import read_history
from engine.launch import make_accelerator
from engine.model import PointwiseConv, eval_mode
from engine.run import DTYPES, build, train_step
from loaders.augment import (
    Augment,
    crop_rows,
    draw_flip_translate,
    gather_flip_translate,
)
from loaders.options import AugmentConfig
from loaders.sharding import epoch_indices
from tools import timing

pytestmark = pytest.mark.gpu

BATCH = 64
SMALL = ["--dataset", "synthetic", "--width", "16", "--batch-size", "128", "--seed", "1"]
E2E_SIZE = ("6000", "600")


def cuda_loader(prepared, kind: str, train: bool) -> loaders.BatchLoader:
    """A loader of the prepared synthetic split that yields bf16 batches on the GPU."""
    return loaders.make_loader(kind, prepared.train if train else prepared.test, train=train,
                               batch_size=BATCH, device="cuda", mean=prepared.mean,
                               std=prepared.std, dtype=torch.bfloat16,
                               augment=AugmentConfig(translate=2, cutout=8), seed=0, workers=1)


# --- loaders and augmentation ------------------------------------------------------------


@pytest.mark.parametrize("kind", loaders.LOADERS)
def test_train_batches_are_bf16_channels_last_on_the_gpu_and_visit_every_sample_once(
        prepared, source, drain, kind):
    loader = cuda_loader(prepared, kind, train=True)
    loader.set_epoch(2)
    batches = drain(loader, timeout=120)
    assert len(batches) == len(loader)
    for images, labels in batches:
        assert images.device.type == "cuda" and labels.device.type == "cuda"
        assert images.dtype == torch.bfloat16 and images.shape == (len(labels), 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
    labels = torch.cat([labels for _, labels in batches]).cpu().numpy()
    order = epoch_indices(len(source.train.labels), epoch=2, seed=0, shuffle=True, rank=0,
                          world_size=1).numpy()
    np.testing.assert_array_equal(labels, source.train.labels[order])  # each index once


@pytest.mark.parametrize("kind", loaders.LOADERS)
def test_test_split_comes_in_order_normalized_on_the_gpu(prepared, source, drain, kind):
    batches = drain(cuda_loader(prepared, kind, train=False), timeout=120)
    labels = torch.cat([labels for _, labels in batches]).cpu().numpy()
    np.testing.assert_array_equal(labels, source.test.labels)
    images = torch.cat([images for images, _ in batches]).float().cpu().numpy()
    mean, std = (np.reshape(v, (3, 1, 1)) for v in (prepared.mean, prepared.std))
    want = (source.test.images.transpose(0, 3, 1, 2) / 255 - mean) / std
    np.testing.assert_allclose(images, want, rtol=1 / 128, atol=1 / 64)  # bf16: 8-bit mantissa


@pytest.mark.parametrize("kind", loaders.LOADERS)
def test_a_last_batch_of_one_sample_reaches_the_gpu(prepared, source, drain, kind):
    # 201 test images in batches of 100: the last one holds a single sample, whose label
    # FFCV's Squeeze() would turn into a 0-d tensor that its ToDevice cannot index
    loader = loaders.make_loader(kind, prepared.test, train=False, batch_size=100,
                                 device="cuda", mean=prepared.mean, std=prepared.std,
                                 dtype=torch.bfloat16, workers=1)
    batches = drain(loader, timeout=120)
    assert [len(labels) for _, labels in batches] == [100, 100, 1]
    images, labels = batches[-1]
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1,)
    assert labels.item() == source.test.labels[-1]


@pytest.mark.parametrize("kind, lag", [*((kind, "training") for kind in loaders.LOADERS),
                                       ("ffcv", "copy")])
def test_batches_stay_right_while_the_gpu_lags_behind(prepared, source, drain, kind, lag):
    """Each batch is followed by a kernel that keeps the GPU busy, so the host runs ever further
    ahead: a copy still queued behind that work when the loader reuses its host buffer (FFCV
    refills a few in turn) would deliver another batch's pixels. The ffcv loader's copy stream
    lagging instead: a batch augmented before its copy is done (no wait for that stream) would
    read memory the copy has not written yet."""

    def lagging(loader):
        for batch in loader:
            yield batch
            if lag == "training":  # about 5 ms at 2 GHz, queued after the batch's use
                torch.cuda._sleep(10_000_000)

    loader = loaders.make_loader(kind, prepared.test, train=False, batch_size=16, device="cuda",
                                 mean=prepared.mean, std=prepared.std, dtype=torch.float32,
                                 workers=1)
    if lag == "copy":
        owned = loader.owned

        def owned_late(images: torch.Tensor, labels: torch.Tensor):
            with torch.cuda.stream(loader.copy_stream):
                torch.cuda._sleep(10_000_000)  # queued before the batch's copies
            return owned(images, labels)

        loader.owned = owned_late
    batches = drain(lagging(loader), timeout=120)
    labels = torch.cat([labels for _, labels in batches]).cpu().numpy()
    np.testing.assert_array_equal(labels, source.test.labels)
    images = torch.cat([images for images, _ in batches]).cpu().numpy()
    mean, std = (np.reshape(v, (3, 1, 1)) for v in (prepared.mean, prepared.std))
    want = (source.test.images.transpose(0, 3, 1, 2) / 255 - mean) / std
    np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)


def test_the_ffcv_copy_stream_is_none_that_ffcv_or_cuda_graphs_take(prepared, drain):
    """torch hands out each priority's 32 pooled streams in turn; FFCV's epochs take 5 of the
    default priority's each, and queue waits for training there. A copy stream among them
    waited for training too (found by reading, not yet seen on a GPU)."""
    loader = cuda_loader(prepared, "ffcv", train=True)
    for epoch in range(3):  # FFCV's streams of three epochs
        loader.set_epoch(epoch)
        drain(loader, timeout=120)
    taken = [torch.cuda.Stream() for _ in range(64)]  # every stream of the default pool, twice
    assert all(stream != loader.copy_stream for stream in taken)


@pytest.mark.parametrize("reflect", [True, False], ids=["reflect", "zeros"])
def test_flip_and_translate_on_cuda_equal_the_cpu_for_the_same_draws(reflect):
    cfg = AugmentConfig(translate=4, reflect=reflect)
    images = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    shift, flip = draw_flip_translate(len(images), cfg, torch.Generator().manual_seed(1), "cpu")
    assert flip.any() and not flip.all() and shift.abs().max() == 4  # the draws do something
    on_cpu = gather_flip_translate(images, cfg, shift, flip)
    on_gpu = gather_flip_translate(images.cuda(), cfg, shift.cuda(), flip.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert not torch.equal(on_cpu, images)
    # the resident loader's way: a split stored padded and mirrored, gathered by whole rows
    stored = Augment(cfg, [0.5] * 3, [0.25] * 3, torch.bfloat16, "cpu").store(images)
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(2))[:300]
    draws = shift[:, :300], flip[:300]
    on_cpu = crop_rows(stored, cfg, *draws, index)
    on_gpu = crop_rows(stored.cuda(), cfg, *(d.cuda() for d in draws), index.cuda())
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.slow  # stock FFCV's numba JIT: seconds
def test_every_peer_and_ours_beside_it_run_the_same_split_batch_and_augmentations(drain,
                                                                                 tmp_path):
    """test_bench's fair lineup with every loader on the GPU, where the peers table's figures
    come from (check_the_lineup)."""
    check_the_lineup(tmp_path, torch.device("cuda"), drain)


def test_normalization_on_cuda_equals_the_cpu():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    on_cpu = Augment(None, mean, std, torch.float32, "cpu")(images)
    on_gpu = Augment(None, mean, std, torch.float32, "cuda")(images.cuda())
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pointwise_conv_on_cuda_equals_a_strided_convolution(dtype, monkeypatch):
    """The shortcut's subsampling route computes what cuDNN's strided 1x1 convolution does,
    in the training layout, values and both gradients.

    fp32 without TF32: cuDNN may run one of the two convolutions on TF32 tensor cores (inputs
    rounded to 10 mantissa bits) and the other on full-fp32 kernels, its heuristics choosing
    per shape; the weight gradient, a sum of 8192 products, then differs by TF32's rounding
    (up to 2^-11 of each product) summed over them, beyond the 1e-3 allowed where it is near
    0. Both in full fp32, only their summing orders differ."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    ours = PointwiseConv(64, 128, stride=2).cuda().to(dtype)
    plain = torch.nn.Conv2d(64, 128, 1, stride=2, bias=False).cuda().to(dtype)
    plain.weight.data.copy_(ours.weight.data)
    x = torch.randn(32, 64, 32, 32, device="cuda", dtype=dtype).to(
        memory_format=torch.channels_last).requires_grad_()
    y = torch.randn(32, 128, 16, 16, device="cuda", dtype=dtype)
    grads = []
    for conv in (ours, plain):
        x.grad = None
        out = conv(x)
        (out.float() * y).sum().backward()
        grads.append((out, x.grad, conv.weight.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert not torch.equal(grads[0][1], torch.zeros_like(x))  # the input's gradient is there


# --- the training step -------------------------------------------------------------------


def test_the_default_precision_is_bf16_only_where_the_gpu_has_it_natively():
    """A T4 or a V100 (compute capability below 8.0) trains in fp16 with the scaler by default:
    inductor will not compile bf16 there."""
    want = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert resolve(TrainConfig(), cuda=True, bf16=native_bf16()).precision == want


@pytest.mark.parametrize("precision, compile, mode", [
    ("bf16", False, "default"), ("bf16", True, "default"), ("fp16", False, "default"),
    # CUDA graphs: a compile of its own, so with the end-to-end tests (after the quick ones)
    pytest.param("bf16", True, "reduce-overhead", marks=pytest.mark.slow)])
def test_training_step_lowers_the_loss(prepared, tmp_path, precision, compile, mode):
    cfg = TrainConfig(dataset="synthetic", data_dir=str(prepared.source.parent),
                      synthetic_size=SYNTHETIC_SIZE, width=16, batch_size=128, loader="resident",
                      precision=precision, compile=compile, compile_mode=mode,
                      schedule="constant", lr=0.05, label_smoothing=0.0, workers=1,
                      out=str(tmp_path / "run"))
    run = build(resolve(cfg, cuda=True), make_accelerator(cfg))
    assert (run.scaler is not None) == (precision == "fp16")
    images, labels = next(iter(run.train_loader))
    assert images.dtype == DTYPES[precision] and images.device.type == "cuda"
    counters.clear()
    losses = [train_step(run, images, labels)[0].item() / len(labels) for _ in range(20)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # inductor counts each graph it could not capture (tests/test_step.py: on the CPU, one)
    assert counters["inductor"]["cudagraph_skips"] == 0
    # and each input it copies into a graph as it records one (the images, at least): no skip
    # is also what a step that never reached CUDA graphs (run eagerly, or compiled without
    # them) counts, so the reduce-overhead case must show a recording, the others none
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert (recorded > 0) == (mode == "reduce-overhead"), dict(counters["inductor"])


# --- engine/train.py end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def train(*args, timeout: float = 540) -> subprocess.CompletedProcess:
    return run_script("engine/train.py", *SMALL, *args, timeout=timeout)


@pytest.fixture(scope="module", params=["resident", "ffcv"])
def cuda_run(request, data_dir, tmp_path_factory) -> Path:
    """2 epochs with the CUDA defaults (bf16, torch.compile on CUDA graphs, channels_last) and
    the loader."""
    out = tmp_path_factory.mktemp("cuda-run") / request.param
    result = train("--synthetic-size", *E2E_SIZE, "--data-dir", data_dir, "--epochs", "2",
                   "--loader", request.param, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [t for v in items for t in tensors(v)] if isinstance(value, dict | list | tuple) else []


# a few of bf16's rounding steps (2^-8 to 2^-7 of a value) at the top score's size
BORDERLINE = 2**-5


def borderline_samples(model: torch.nn.Module, loader: loaders.BatchLoader, tta: bool,
                       autocast: Callable[[], AbstractContextManager]) -> int:
    """How many samples' two highest class scores (evaluate's: bf16 logits, TTA averaged) lie
    within BORDERLINE of the highest one's size: another convolution algorithm (cuDNN's
    autotuning picks by timing, per process) rounds some bf16 activations the other way, which
    can move such a sample's argmax, and with it the count of correct answers, either way."""
    count = 0
    with torch.no_grad(), eval_mode(model):
        for images, _ in loader:
            with autocast():
                top2 = logits_of(model, images, tta).topk(2, dim=1).values
            gap = top2[:, 0] - top2[:, 1]
            count += int((gap <= BORDERLINE * top2[:, 0].abs().clamp(min=1)).sum())
    return count


@pytest.mark.slow
def test_cuda_run_reports_the_accuracy_of_its_checkpoint(cuda_run, monkeypatch):
    config = json.loads((cuda_run / "config.json").read_text())
    # the engine's CUDA defaults, CUDA graphs included: what a user's GPU run trains with
    assert (config["precision"], config["compile"], config["compile_mode"]) == (
        "bf16", True, "reduce-overhead")
    ckpt = checkpoint.load(cuda_run / "ckpt.pt")
    saved = torch.load(cuda_run / "ckpt.pt", weights_only=True)  # each tensor where saved
    assert {t.device.type for t in tensors(saved["resume"])} == {"cpu"}  # loads anywhere
    last = ckpt["history"][-1]
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2] and last["test_acc"] > 0.5
    # an independent evaluation: the weights rebuilt eagerly, a fresh loader, the run's bf16,
    # the run's test batch size (2x), cuDNN's autotuning as the run had it (not as an earlier
    # test in this worker left it: engine.run.build sets it for the process)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", TrainConfig(**config).autotunes())
    model = checkpoint.model_from(ckpt).cuda().to(memory_format=torch.channels_last)
    loader = loaders.make_loader("resident", Path(ckpt["data"]["test"]), train=False,
                                 batch_size=2 * config["batch_size"], device="cuda",
                                 mean=ckpt["mean"], std=ckpt["std"], dtype=torch.bfloat16)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    loss, correct, count = evaluate(model, loader, tta=config["tta"], autocast=autocast).tolist()
    assert count == last["test_images"] == int(E2E_SIZE[1])
    # autotuning times its way to its own kernels in each process, so the run's may not be
    # these: a sample near a tie between two classes may then go either way (one sample was
    # the margin when both processes used cuDNN's heuristics, which pick alike)
    borderline = borderline_samples(model, loader, config["tta"], autocast)
    assert abs(correct - last["test_acc"] * count) <= max(1, borderline), (
        correct, last["test_acc"] * count, borderline)
    assert loss / count == pytest.approx(last["test_loss"], rel=1e-2)


@pytest.mark.slow
def test_resume_on_cuda_gives_the_uninterrupted_history(data_dir, tmp_path):
    # --deterministic: without it cuDNN's backward adds in no fixed order, and the first H200
    # run failed this test (its traceback lost), as another summing order alone would
    # (benchmarks/results/resume-noise-threads-cpu-2core.log: 0.05 apart in test loss)
    common = ["--synthetic-size", "20000", "600", "--data-dir", str(data_dir), "--epochs", "4",
              "--loader", "resident", "--no-compile", "--precision", "fp32", "--deterministic"]
    full = tmp_path / "full"
    result = train(*common, "--out", full)
    assert result.returncode == 0, result.stderr[-3000:]

    cut = tmp_path / "cut"
    returncode, stderr = interrupt_after_first_epoch([*SMALL, *common], cut)
    # stopped mid-run, as tests/test_train.py's CPU resume requires: a run that ended before
    # its Ctrl-C landed would leave nothing to resume, and the comparison below would then
    # hold between two uninterrupted runs, passing without a resume
    done = len(read_history(cut))
    assert returncode == 130 and f"--resume {cut}" in stderr and done < 4, (
        returncode, done, stderr[-3000:])

    resumed = train("--resume", cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # torch's warnings for ops without a deterministic version: a failure below names them
    nondeterministic = [line for line in (result.stderr + resumed.stderr).splitlines()
                        if "deterministic" in line]
    for a, b in zip(read_history(full), read_history(cut), strict=True):
        assert (a["epoch"], a["lr"], a["train_images"]) == (b["epoch"], b["lr"],
                                                            b["train_images"])
        # as the CPU's resume test (tests/test_train.py: within 1e-4), a little looser: an op
        # without a deterministic version (its warning is in stderr) may still add noise
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (
                a["epoch"], key, nondeterministic, resumed.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.gpu_alone
def test_impossible_batch_size_ends_in_the_out_of_memory_message(data_dir, tmp_path):
    out = tmp_path / "oom"
    # the batch is capped at the 50k-image split: in fp32 (twice bf16's bytes) ResNet-18's
    # saved activations for 50k images are far over any GPU's memory; bf16's might fit an H200
    result = train("--synthetic-size", "50000", "100", "--data-dir", data_dir, "--width", "64",
                   "--batch-size", "10000000", "--epochs", "1", "--no-compile", "--precision",
                   "fp32", "--out", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert ("out of memory at --batch-size 10000000 (batches of 50000, the whole split); try "
            "--batch-size 25000.") in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # a run that never finished an epoch leaves no folder behind


def test_no_cudnn_engine_counts_as_out_of_memory_once_an_allocation_failed():
    """With cuDNN autotuning, a convolution whose workspaces do not fit ends in torch's 'FIND
    was unable to find an engine' (it skips each engine whose allocation failed); the
    allocator's count of refusals tells that from a convolution no engine supports."""
    words = RuntimeError("FIND was unable to find an engine to execute this computation")
    torch.cuda.init()
    torch.cuda.reset_accumulated_memory_stats()  # num_ooms back to 0
    assert not out_of_memory(words)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2**60, dtype=torch.uint8, device="cuda")  # an exbibyte: refused at once
    assert out_of_memory(words)


# --- the tools ---------------------------------------------------------------------------


def test_the_matmul_peak_times_the_gpus_products_not_their_launches():
    """The MFU's denominator: its host clock read before the GPU finished would time the
    launches alone, a peak many times too high. Short blocks (a few products each, not enough
    to fill CUDA's launch queue, which would hide it) against CUDA events around the same
    products, which time them on the GPU itself."""
    n = 4096
    peak = timing.matmul_peak("bf16", torch.device("cuda"), n, 0.003, 3)
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(peak.reps):
        torch.matmul(a, b)
    end.record()
    end.synchronize()
    on_the_gpu = 2 * n**3 * peak.reps / (start.elapsed_time(end) / 1e3)
    assert 0.5 < peak.flops_per_s / on_the_gpu < 2, (peak, on_the_gpu)


@pytest.mark.slow
def test_report_on_cuda(cuda_run, tmp_path):
    out = tmp_path / "report"
    result = run_script("tools/report.py", cuda_run / "ckpt.pt", "--device", "cuda", "-n", "4",
                        "--out", out, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("curves.png", "misclassified.png", "confusion.png", "per_class.csv",
                 "summary.md", "gradcam.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "gradcam.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_lr_find_on_cuda(data_dir, tmp_path):
    out = tmp_path / "lr"
    result = run_script("tools/lr_find.py", *SMALL, "--synthetic-size", *E2E_SIZE,
                        "--data-dir", data_dir, "--loader", "resident", "--start-lr", "1e-4",
                        "--iterations", "30", "--out", out, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert len((out / "lr_find.csv").read_text().splitlines()) > 2
    assert "suggested lr" in result.stdout


@pytest.mark.slow
@pytest.mark.gpu_alone
def test_bench_quick_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("tools/bench.py", "--quick", "--device", "cuda", "--data-dir",
                        tmp_path / "data", "--json", out, timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert bench["meta"]["device"] == "cuda" and bench["meta"]["cuda"]
    assert {r["loader"] for r in bench["loaders"]} == set(loaders.LOADERS)
    assert any(r["status"] == "ok" and r["precision"] == "fp16" for r in bench["step"])
    assert bench["mfu"]["rows"] and all(0 < row["mfu"] < 1 for row in bench["mfu"]["rows"])
    # each loader's epoch with cuDNN's autotuning, then the default loader's without it
    assert [(r["status"], r["cudnn_benchmark"]) for r in bench["epoch"]] == (
        [("ok", True)] * len(loaders.LOADERS) + [("ok", False)]), bench["epoch"]
    profile = bench["profile"]  # ranked by the kernels' time on the GPU
    assert profile["sort_by"] == "self_device_ms" and profile["ops"][0]["self_device_ms"] > 0
    names = [op["name"] for op in profile["ops"]]  # ops, not also their kernels by the same name
    assert len(set(names)) == len(names), names
    # the device ran kernels for part of each step, and not longer than the step (timed apart,
    # so up to their noise)
    assert profile["device_busy_ms"] > 0 and 0 < profile["device_busy_share"] < 1.2, profile
    # its kernels by kind, named even when CUDA graphs replay them: convolutions among them
    kinds = {row["kind"]: row for row in profile["kernel_kinds"]}
    assert kinds["convolution forward"]["ms"] > 0 and kinds["convolution weight gradient"]["ms"] > 0
    assert sum(row["share"] for row in kinds.values()) == pytest.approx(1), kinds
    # both per step: the busy time counts overlapping kernels once, the kinds each of them
    assert profile["device_busy_ms"] <= sum(row["ms"] for row in kinds.values()) * (1 + 1e-6)
    # each loader of the peers section, profiled for an epoch: how long the device worked
    peers = [r for r in bench["peers"]["loaders"] if r["status"] == "ok"]
    assert peers and all(r["device_busy_ms"] > 0 and r["device_events"] > 0 for r in peers)
    # the op with most device time, but not of stock FFCV: its ops run on FFCV's thread
    assert all(bool(r["top_op"]) == (r["loader"] != "stock ffcv.Loader") for r in peers), peers

"""tools/bench.py: real --quick runs on CPU as subprocesses (every section's, from the GPU
suite's dry run: conftest's gpu_suite_dry_run), and the FLOP and MFU arithmetic."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, replace
from itertools import repeat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    MACHINE_CORES,
    ROOT,
    SYNTHETIC_SIZE,
    SignalsWhenCollected,
    check_the_lineup,
    children,
    data_workers,
    run_script,
    running,
    wait_until,
)
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.overrides import TorchFunctionMode

import engine.options
import engine.run
import loaders
from common.cli import run_main
from common.errors import LoaderError
from common.hardware import native_bf16
from engine import checkpoint
from engine.config import MAX_WIDTH, TrainConfig, resolve
from engine.model import ResNet18, forward_macs
from loaders.base import BatchLoader
from loaders.preparation import Prepared
from loaders.python_folder import synthetic_folder_name
from tools import (
    bench,
    bench_mfu,
    bench_options,
    bench_output,
    bench_peers,
    bench_profile,
    bench_run,
    bench_sections,
    bench_setup,
    timing,
)
from tools.bench_mfu import count_train_flops
from tools.bench_output import NAME_WIDTH, shortened
from tools.timing import Peak, timed_epoch_steps


def run_bench(tmp: Path, *args: str) -> tuple[dict, str]:
    """Run `python tools/bench.py --quick --device cpu` with args; its JSON and its stdout."""
    out = tmp / "bench.json"
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", "--data-dir",
                        tmp / "data", "--json", out, *args, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def quick(gpu_suite_dry_run) -> tuple[dict, str]:
    """`tools/bench.py --quick --device cpu` over every section, as the GPU suite's dry run
    ran it in three parts (bench-epoch, bench-peers, bench-step): their JSONs merged, each
    one's meta kept under its name, and their logs."""
    report, logs = {"meta": {}}, []
    for name in ("bench-epoch", "bench-peers", "bench-step"):
        part = json.loads((gpu_suite_dry_run.results / f"{name}.json").read_text())
        report["meta"][name] = part.pop("meta")
        report.update({k: v for k, v in part.items() if k not in ("options", "mfu")})
        report.setdefault("mfus", {})[name] = part["mfu"]
        logs.append((gpu_suite_dry_run.results / f"{name}.log").read_text())
    return report, "\n".join(logs)


@pytest.mark.slow
def test_quick_runs_record_metadata(quick):
    report, logs = quick
    for name, meta in report["meta"].items():
        assert meta["command"].startswith("python tools/bench.py --device cpu --sections ")
        assert meta["command"].endswith("--quick"), name
        assert meta["device"] == "cpu" and meta["device_name"].startswith("cpu (")
        assert meta["torch"] and "cuda" in meta and meta["date"] and meta["commit"]
        assert len(meta["load_average"]) == 3 and min(meta["load_average"]) >= 0
        assert meta["complete"] is True
        assert f"command: {meta['command']}" in logs
    assert {s for meta in report["meta"].values() for s in meta["section_s"]} == set(
        bench_options.SECTIONS)
    for section in bench_options.SECTIONS:
        assert f"== {section}" in logs


@pytest.mark.slow
def test_quick_run_measures_every_loader(quick):
    loaders = {r["loader"]: r for r in quick[0]["loaders"]}
    assert set(loaders) == {"ffcv", "resident", "torchvision"}
    for r in loaders.values():
        assert r["images"] == 2048 and r["images_per_s"] > 0
        # one turn (--quick): as many epochs as fill it (tools.timing.loader_turn)
        assert r["first_epoch_s"] > 0 and 1 <= len(r["epoch_s"]) <= timing.TURN_EPOCHS
    assert loaders["torchvision"]["vs_torchvision"] == 1


@pytest.mark.slow
def test_quick_run_times_steps_and_skips_what_cannot_run(quick):
    rows = quick[0]["step"]
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["precision"], r["memory_format"]) for r in ran} >= {
        ("fp32", "channels_last"), ("fp32", "contiguous"), ("bf16", "channels_last")}
    assert {r["batch_size"] for r in ran} == {64, 32}
    assert all(r["images_per_s"] > 0 and r["block_s"] for r in ran)
    fp16 = [r for r in rows if r["precision"] == "fp16"]
    assert fp16 and all(r["status"] == "skipped" and "fp16" in r["reason"] for r in fp16)


@pytest.mark.slow
def test_quick_run_measures_epochs_and_data_wait(quick):
    epochs = {r["loader"]: r for r in quick[0]["epoch"]}
    assert set(epochs) == {"ffcv", "resident", "torchvision"}
    for r in epochs.values():
        assert r["images"] == 256 and r["images_per_s"] > 0
        assert 0 <= r["data_wait_share"] <= 1
        assert all(0 < first <= wait for first, wait in
                   zip(r["first_batch_wait_s"], r["data_wait_s"], strict=True))
        # the same images as steps on one batch: the loader's cost is what the epoch adds
        assert r["step_only_s"] > 0
        assert r["loader_overhead_share"] == pytest.approx(
            1 - r["step_only_s"] / min(r["epoch_s"]))


@pytest.mark.slow
def test_quick_run_reports_mfu_against_measured_peaks(quick):
    report = quick[0]
    ran = [r for r in report["step"] if r["status"] == "ok"]
    peer_epochs = report["peers"]["epochs"]
    # each run's MFU covers the throughputs measured in it
    for name, measured in (("bench-epoch", report["epoch"]), ("bench-step", ran),
                           ("bench-peers", peer_epochs)):
        mfu = report["mfus"][name]
        assert mfu["hand_count_flops_per_image"] == 6 * mfu["macs_per_image"]
        assert mfu["train_flops_per_image"] == pytest.approx(mfu["hand_count_flops_per_image"],
                                                             rel=0.02)
        assert sum(mfu["flops_by_module"].values()) == mfu["train_flops_per_image"]
        assert mfu["peaks"]["fp32"]["flops_per_s"] > 0
        assert len(mfu["rows"]) == len(measured) > 0, name
        for row in mfu["rows"]:
            peak = mfu["peaks"][row["precision"]]["flops_per_s"]
            flops = (peer_epochs[0]["train_flops_per_image"] if row["source"] == "peers"
                     else mfu["train_flops_per_image"])
            share = row["images_per_s"] * flops / peak
            if row["precision"] in mfu["not_peaks"]:  # bf16 here: its matmul is no peak
                assert row["mfu"] is None
            else:
                assert row["mfu"] == pytest.approx(share) and 0 < row["mfu"] <= 1
        assert mfu["not_peaks"] == sorted({row["precision"] for row in mfu["rows"]
                                           if row["achieved_flops_per_s"]
                                           > row["peak_flops_per_s"]})


@pytest.mark.slow
def test_quick_run_records_every_peer_or_why_not(quick):
    report, stdout = quick
    rows = report["peers"]["loaders"]
    assert [r["loader"] for r in rows if r["role"] == "peer"] == [
        "airbench.CifarLoader", "stock ffcv.Loader", "seed torchvision DataLoader"]
    assert {r["loader"] for r in rows if r["role"] == "ours"} == {"resident", "ffcv"}
    # ours always run: a row of ours that failed (construct() records any row's error) is no
    # peer missing here
    assert {r["status"] for r in rows if r["role"] == "ours"} == {"ok"}, rows
    assert "== peers: loaders" in stdout and "== peers: training epoch" in stdout
    speed = {r["loader"]: r for r in rows if r["role"] == "peer"}
    for r in rows:
        if r["status"] == "ok":
            assert r["images"] == 2048 and r["images_per_s"] > 0
            assert 1 <= len(r["epoch_s"]) <= timing.TURN_EPOCHS  # one turn of epochs
            assert r["output"].endswith("3x32x32 channels_last") or r["role"] == "peer"
            # the profiled epoch's op of most (host) time, but none of stock FFCV's, whose
            # transforms run on its own thread; device figures only on a GPU
            assert r["top_op"].endswith(" ms") == (r["loader"] != "stock ffcv.Loader")
            assert r["device_busy_ms"] is None
        else:  # a peer that cannot run here says why and how to fix it
            assert r["status"] in ("not installed", "failed") and r["reason"]
        if r["role"] == "ours" and speed[r["versus"]]["status"] == "ok":
            assert r["ratio"] == pytest.approx(
                r["images_per_s"] / speed[r["versus"]]["images_per_s"])
    # ours is compared in the output the peer hands over: fp16 beside airbench
    assert rows[1]["versus"] == "airbench.CifarLoader" and rows[1]["output"].startswith("float16")
    seed, default = report["peers"]["epochs"]
    assert (seed["pipeline"], seed["loader"], seed["precision"], seed["channels_last"]) == (
        "seed", "torchvision", "fp32", False)
    # the default's 512 over 256 images ran as one batch of 256, and its row says so
    assert (default["pipeline"], seed["batch_size"], default["batch_size"]) == (
        "default", 128, 256)
    assert seed["vs_seed"] == 1 and default["vs_seed"] > 0
    assert seed["images"] == default["images"] == 256 and seed["width"] == 8
    assert seed["train_flops_per_image"] == count_train_flops(ResNet18(width=8))[0]


@pytest.mark.slow
def test_quick_run_profiles_training_steps_and_writes_their_trace(quick):
    profile = quick[0]["profile"]
    assert (profile["steps"], profile["warmup_steps"], profile["sort_by"]) == (2, 1, "self_cpu_ms")
    assert profile["loader"] == "ffcv" and profile["width"] == 8  # the CPU defaults, quick
    times = [op["self_cpu_ms"] for op in profile["ops"]]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert "== profile: 2 steps after 1 warm-up" in quick[1]
    # nor kineto's lines, two a profile (this and each peer's), amid the tables
    assert "profiler_start" not in quick[1] and "gpuGetDeviceCount" not in quick[1]
    # device busy: for a GPU, where a device runs apart from the host
    assert profile["device_busy_ms"] is profile["step_ms"] is profile["device_busy_share"] is None
    assert profile["kernel_kinds"] is None  # no kernels on the CPU
    with gzip.open(profile["trace"]) as trace:  # beside --json, a Chrome trace
        events = json.load(trace)["traceEvents"]
    # exactly the profiled steps: ResNet-18 runs 20 convolutions forward per step
    assert sum(e.get("name") == "aten::convolution" for e in events) == 2 * 20


@pytest.mark.parametrize("spans, busy", [
    ([], 0),
    ([(0, 2), (5, 6)], 3),  # apart
    ([(0, 4), (1, 2), (3, 6)], 6),  # nested, then overlapping: each moment counted once
    ([(3, 6), (0, 4)], 6),  # in any order
])
def test_device_busy_time_counts_each_moment_once(spans, busy):
    """Kernels on two streams, or a copy beside a kernel, overlap: the device is busy while
    any of them runs, so their summed durations would overstate it."""
    assert bench_profile.covered(spans) == busy


def test_device_events_leave_out_the_spans_of_annotated_scopes():
    """kineto draws each record_function scope (inductor's '## Call CompiledFxGraph') as a
    device event from its first kernel to its last: counted, the gaps between kernels were busy
    time. Events as torch 2.5 on makes them of a CUDA profile."""
    def event(name: str, start: int, end: int, annotation: bool) -> FunctionEvent:
        return FunctionEvent(0, name, 0, start, end, device_type=DeviceType.CUDA,
                             is_user_annotation=annotation)

    class Profile:  # what device_events reads of a torch.profiler.profile
        def events(self) -> list[FunctionEvent]:
            return [event("## Call CompiledFxGraph ##", 0, 100, True),
                    event("triton_poi_fused", 0, 10, False),
                    event("cutlass_gemm", 90, 100, False),
                    FunctionEvent(0, "aten::mm", 0, 0, 100)]  # a host op

    events = bench_profile.device_events(Profile())
    assert [e.name for e in events] == ["triton_poi_fused", "cutlass_gemm"]
    assert bench_profile.device_busy_us(events) == 20
    assert bench_profile.device_busy_ms(events) == 0.02


def test_a_cuda_profile_without_device_events_has_no_busy_time():
    """A CUDA profile of GPU steps without a single kernel is CUPTI not attached (its error
    hidden by KINETO_LOG_LEVEL=6): no busy time, not 0 ms, which would read as measured."""
    class Profile:  # what device_events reads of a torch.profiler.profile: host ops only
        def events(self) -> list[FunctionEvent]:
            return [FunctionEvent(0, "aten::mm", 0, 0, 100)]

    events = bench_profile.device_events(Profile())
    assert (bench_profile.device_busy_ms(events), len(events)) == (None, 0)


def test_the_profile_table_cuts_long_kernel_names():
    """cuDNN's templated kernel names run to 1,600 characters: the first H200 profile table
    padded every row to that width. The JSON keeps the whole name."""
    long = "_ZN17cutlass__5x_cudnn6KernelINS_4conv6kernel" + "x" * 1600
    assert shortened(long) == long[:NAME_WIDTH - 3] + "..." and len(shortened(long)) == NAME_WIDTH
    assert shortened("aten::convolution_backward") == "aten::convolution_backward"
    assert shortened("x" * NAME_WIDTH) == "x" * NAME_WIDTH  # fits: kept whole, not cut
    assert shortened("x" * (NAME_WIDTH + 1)) == "x" * (NAME_WIDTH - 3) + "..."


def test_the_printed_tables_set_the_peers_after_the_loaders_and_name_the_peaks_outpaced():
    """The log's tables in the sections' order (the peers' loaders beside ours, after them,
    before the steps; first where the loaders did not run), and a dtype whose matmul a run
    outpaced is said to have no MFU: its rows' MFU cells are empty, and this line says why."""
    peak = Peak("fp32", 1024, 4, [0.5, 0.4], 2e12, "fp32")
    mfu = bench_mfu.MfuResult(6000, {}, 1000, 6000, peaks={"fp32": peak}, not_peaks=["bf16"])
    text = bench_output.report({"loaders": [], "step": [], "mfu": mfu,
                                "peers": {"loaders": [], "epochs": []}})
    def titles(text: str) -> list[str]:
        return [line.split(" (")[0].split(",")[0] for line in text.splitlines()
                if line.startswith("== ")]

    assert titles(text) == ["== loaders", "== peers: loaders", "== peers: training epoch",
                            "== step", "== mfu"]
    # without the loaders section, the peers come first
    assert titles(bench_output.report({"step": [], "peers": {"loaders": [], "epochs": []}})) == [
        "== peers: loaders", "== peers: training epoch", "== step"]
    assert "fp32 peak: 2.000 TFLOP/s (1024^3 fp32 matmul, fastest of 2 blocks of 4)" in text
    assert ("no bf16 MFU: a bf16 run computed faster than the bf16 matmul, so that matmul is "
            "not this device's peak") in text.splitlines()


def test_the_commit_is_marked_dirty_by_a_changed_tracked_file_only(tmp_path, monkeypatch):
    """A result must say when it was measured on code that differs from its commit: a changed
    tracked file adds -dirty, an untracked one (the log being written) does not; a copy
    without .git (a GPU machine's) names $GPU_SUITE_COMMIT."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(bench_output, "ROOT", tmp_path)
    (tmp_path / "bench.log").write_text("written meanwhile")
    assert bench_output.commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench_output.commit() == f"{head}-dirty"
    monkeypatch.setattr(bench_output, "ROOT", tmp_path / "no-checkout")
    monkeypatch.setenv("GPU_SUITE_COMMIT", "abc123")
    assert bench_output.commit() == "abc123"


def test_metadata_on_the_cpu_names_no_cuda_it_did_not_run_on():
    """cuda and cudnn are the versions a run used: None on the CPU, even with a CUDA build of
    torch (its version is kept apart, as torch_cuda_build)."""
    meta = bench_output.metadata(torch.device("cpu"), ["--quick"])
    assert meta["cuda"] is None and meta["cudnn"] is None
    assert meta["torch_cuda_build"] == torch.version.cuda and meta["device"] == "cpu"
    assert meta["command"] == "python tools/bench.py --quick" and meta["argv"] == ["--quick"]


def test_a_table_cell_has_thousands_separators_from_100_and_3_digits_below():
    """Images per second run to tens of thousands: 12,345.7, not 12345.7 or 1.23e+04."""
    number = bench_output.number
    assert [number(v) for v in (12345.67, 100.0, 99.94, 0.012345, 2048, None, True)] == [
        "12,345.7", "100.0", "99.9", "0.0123", "2048", "", "True"]
    assert number([1500.0, 0.5]) == "1,500.0 0.5"
    # a fast loader's 32 epochs of a turn: their count and range
    assert number([0.0131, *[0.0129] * 30, 0.0151]) == "32: 0.0129..0.0151"


def test_the_help_gives_each_default_once_where_cuda_and_cpu_share_it():
    """--help's defaults: one value where CUDA's and the CPU's agree, both named where not,
    and --quick's (an empty list as none)."""
    assert bench_options.default_text("batch_size") == (
        "default: 512 on CUDA, 256 on CPU, quick 64")
    assert bench_options.default_text("width") == "default: 64, quick 8"
    assert bench_options.default_text("compile_modes") == (
        "default: default,reduce-overhead, quick none")


def test_the_step_sections_precisions_left_out_are_all_three_the_help_names(capsys):
    """--precisions left out: fp32, bf16 and fp16, as --help says."""
    assert bench_options.parse_args([]).precisions == ["fp32", "bf16", "fp16"]
    with pytest.raises(SystemExit):
        bench_options.parse_args(["--help"])
    assert "(default: fp32,bf16,fp16)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_sections_choose_what_runs(tmp_path):
    report, stdout = run_bench(tmp_path, "--sections", "mfu")
    assert {"loaders", "step", "epoch"}.isdisjoint(report) and "== step" not in stdout
    assert report["meta"]["complete"] is True and list(report["meta"]["section_s"]) == ["mfu"]
    assert report["mfu"]["rows"] == [] and report["mfu"]["peaks"]["fp32"]["flops_per_s"] > 0
    assert stdout.splitlines()[-1] == f"wrote {tmp_path / 'bench.json'}"  # --json, said last


@pytest.fixture(scope="module")
def profile_alone(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`tools/bench.py --quick --sections profile`, its --json in folders still to make and
    KINETO_LOG_LEVEL unset (as users run it): the run and its --json."""
    out = tmp_path_factory.mktemp("profile") / "new" / "results" / "bench.json"
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", "--sections", "profile",
                        "--data-dir", out.parents[2] / "data", "--json", out, timeout=900,
                        env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, out


@pytest.mark.slow
def test_the_profile_section_prints_no_lines_of_kineto(profile_alone):
    """kineto, torch.profiler's backend, logs each profile's start and stop, and without a CUDA
    driver an ERROR line that it found no GPU, amid the tables: the bench quiets it."""
    result, _ = profile_alone
    assert "== profile" in result.stdout
    for line in ("profiler_start", "gpuGetDeviceCount"):
        assert line not in result.stdout + result.stderr, result.stderr[-3000:]


def test_a_device_left_out_is_named_as_the_one_measured():
    """Without --device the bench measures the best device here, and args.device names it:
    the defaults' column (fill_defaults) and the CUDA-only rows (epoch_configs) read it, so a
    GPU run left at None would have taken the CPU's sizes and rows."""
    args = bench_options.parse_args(["--quick"])
    device = bench_run.settle_device(args)
    assert args.device == device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_profile_section_profiles_the_loader_asked_for(monkeypatch, tmp_path):
    """profile-ffcv (the GPU suite's step) profiles the epoch section's run fed by
    --profile-loader: it profiled the default loader again."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                                     "--profile-loader", "torchvision"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # settle_device's, undone after the test
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    base = bench_setup.base_config(args, device, args.epoch_images, str(tmp_path))
    profiled = bench_run.profiled_config(args, device, str(tmp_path))
    assert profiled.loader == "torchvision" != base.loader
    assert replace(profiled, loader=base.loader) == base


def test_the_profile_section_profiles_no_cuda_graphs(tmp_path):
    """On a GPU the engine compiles with CUDA graphs (reduce-overhead), whose profiles are
    incorrect through CUPTI (pytorch/kineto#1165): the profile's run compiles the same model in
    torch.compile's default mode instead, and is otherwise the epoch section's. The configs
    only: no GPU is needed to resolve them."""
    args = bench_options.parse_args(["--data-dir", str(tmp_path)])
    bench_options.fill_defaults(args)
    cuda = torch.device("cuda")
    base = bench_setup.base_config(args, cuda, args.epoch_images, str(tmp_path))
    profiled = bench_run.profiled_config(args, cuda, str(tmp_path))
    assert base.compile and base.compile_mode == "reduce-overhead"
    assert profiled == replace(base, compile_mode="default")


def test_a_profile_without_a_trace_records_none_and_prints_none(monkeypatch, tmp_path):
    """Without --json or --trace the profile writes no trace: its JSON field is empty, not
    the text 'None', and the log names no file; its ops are listed slowest first."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                                     "--workers", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # settle_device's, undone after the test
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    result = bench_profile.bench_profile(bench_run.profiled_config(args, device, str(tmp_path)),
                                         args, None)
    assert result.trace == "" and result.steps == 2 and result.sort_by == "self_cpu_ms"
    times = [op["self_cpu_ms"] for op in result.ops]  # the ops taking the most time first
    assert times == sorted(times, reverse=True) and times[0] > times[-1]
    assert "trace:" not in bench_output.report({"profile": result})
    assert not list(tmp_path.glob("*.json.gz"))


def test_ours_beside_airbench_hands_over_its_fp16_then_the_training_dtype(prepared, tmp_path):
    """airbench hands over fp16 whatever the run trains in: ours is set beside it in fp16,
    then in the training dtype."""
    rows = bench_peers.lineup(prepared, TrainConfig(batch_size=64, precision="fp32"),
                              torch.device("cpu"), tmp_path)
    outputs = []
    for row, make in rows[1:3]:
        images, _ = next(iter(make()))
        outputs.append((row.versus, bench_peers.describe(images).split()[0]))
    assert outputs == [("airbench.CifarLoader", "float16"), ("airbench.CifarLoader", "float32")]


@pytest.mark.slow  # stock FFCV's numba JIT: seconds
def test_every_peer_and_ours_beside_it_run_the_same_split_batch_and_augmentations(drain,
                                                                                 tmp_path):
    """A fair lineup on the CPU (check_the_lineup; test_gpu's on CUDA)."""
    check_the_lineup(tmp_path, torch.device("cpu"), drain)


@pytest.mark.slow
def test_the_profile_trace_goes_beside_the_json_in_folders_still_to_make(profile_alone):
    """--json may name folders still to make, and the trace goes beside it; but the trace is
    written first, at the end of the profile section: with no section before it, the folder
    was not made yet, and the command failed after measuring ('cannot use
    .../bench.trace.json.gz: No such file or directory')."""
    _, out = profile_alone
    trace = out.with_name("bench.trace.json.gz")
    assert json.loads(out.read_text())["profile"]["trace"] == str(trace)
    assert trace.stat().st_size > 0


@pytest.mark.slow
def test_sections_run_in_their_own_order_whatever_the_order_given(tmp_path):
    """mfu named before step ran first, with no step to rate. (--json in a folder still to
    make: the first section's save makes it.) A grid of two steps: the order is what counts."""
    out = tmp_path / "new" / "bench.json"
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", "--sections", "mfu,step",
                        "--precisions", "fp32", "--formats", "channels_last",
                        "--data-dir", tmp_path / "data", "--json", out, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["meta"]["section_s"]) == ["step", "mfu"]
    assert {row["source"] for row in report["mfu"]["rows"]} == {"step"}


CORES = len(os.sched_getaffinity(0))  # this process's: pytest_configure set them


@pytest.mark.parametrize("args, message", [
    (["--sections", "loaders,gpu"], "gpu"),
    (["--sections", ""], "--sections needs at least one value"),
    (["--images", "0"], "--images: must be positive, got 0"),
    (["--epochs", "0"], "--epochs: must be positive"),
    (["--repeats", "0"], "--repeats: must be positive"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--steps", "0"], "--steps: must be positive"),
    (["--profile-steps", "0"], "--profile-steps: must be positive"),
    (["--threads", "0"], "--threads: must be positive"),
    (["--matmul-seconds", "-1"], "--matmul-seconds: must be positive"),
    (["--matmul-seconds", "inf"], "--matmul-seconds: must be finite, got inf"),
    (["--batch-size", "1e3"], "--batch-size: invalid int value: '1e3'"),
    (["--images", "1000000000"], "--images 1000000000 needs about 6144.0 GB of memory"),
    (["--batch-sizes", "64,0"], "--batch-sizes: must be positive"),
    (["--batch-sizes", ","], "--batch-sizes needs at least one value"),
    (["--compile-modes", "fast"], "--compile-modes: unknown value(s) fast; choose from default,"),
    (["--precisions", "fp32,fp8"], "--precisions: unknown value(s) fp8; choose from bf16, fp16,"),
    (["--sections", "nope"], "--sections: unknown value(s) nope; choose from loaders, peers,"),
    (["--formats", "channels_last,nhwc"], "--formats: unknown value(s) nhwc; choose from "
                                          "channels_last, contiguous; see --help"),
    (["--profile-loader", "dali"], "--profile-loader: invalid choice: 'dali'"),
    (["--epoch-images", "1"], "--epoch-images 1: the synthetic data needs at least 10 "
                              "training images, one per class"),
    (["--peer-epoch-images", "9"], "--peer-epoch-images 9: the synthetic data needs at least "
                                   "10 training images, one per class"),
    # 99999999999 threads was torch's traceback; as many workers, processes until memory ran out
    (["--threads", "99999999999"], "--threads 99999999999: this process may use "
                                   f"{CORES} core{'s' * (CORES != 1)}; pass --threads {CORES}"),
    (["--workers", "99999999999"], "--workers 99999999999: this process may use"),
    # a model no int64 can size was torch's traceback (engine/train.py refuses it alike)
    (["--width", str(MAX_WIDTH + 1)], f"--width must be at most {MAX_WIDTH} (a wider model's "),
    (["--peer-width", "10" * 10], f"--peer-width must be at most {MAX_WIDTH} "),
    (["--json", "/tmp/" + "a" * 300 + ".json"], "its name is too long (305 bytes; this file "
                                                 "system takes 255, less "),  # the pid's digits
])
def test_impossible_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_options.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, column", [(["--device", "cuda"], 0), (["--device", "cpu"], 1),
                                          (["--device", "cuda", "--quick"], 2)])
def test_options_left_out_take_the_defaults_of_their_device_or_quick(argv, column):
    """A GPU run left to its defaults runs the CUDA column (50,000 images, 8192^3 matmuls), not
    the CPU's smaller one; --quick the quick one on any device; options given stay as given."""
    args = bench_options.parse_args([*argv, "--steps", "7"])
    bench_options.fill_defaults(args)
    for name, values in bench_options.DEFAULTS.items():
        assert getattr(args, name) == (7 if name == "steps" else values[column]), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """--device cuda is checked once torch has loaded: one line, exit 1, nothing written."""
    json = tmp_path / "bench.json"
    assert bench.main(["--device", "cuda", "--quick", "--json", str(json)]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available here; use --device cpu" in err
    assert "Traceback" not in err and not json.exists()


def listed_options(device: str, quick: bool) -> tuple:
    """bench's options and base config for `device`, to list its configurations: no GPU is
    needed for that."""
    args = bench_options.parse_args(["--quick"] if quick else [])
    args.device = device
    bench_options.fill_defaults(args)
    return args, bench_setup.base_config(args, torch.device(device), 1_000, "runs/x")


@pytest.mark.parametrize("device, quick, modes", [("cuda", False, ["default"]),
                                                  ("cpu", False, []), ("cuda", True, [])])
def test_the_step_grid_ends_with_the_other_compile_modes_where_the_engine_compiles(
        device, quick, modes):
    """CUDA's defaults compile with CUDA graphs (reduce-overhead), so the default mode is also
    timed at the base configuration: the change's before and after in one run. The CPU's and
    --quick's defaults do not compile, and time no compile mode either."""
    args, base = listed_options(device, quick)
    configs = bench_sections.step_configs(base, args)
    grid = [base.compile_mode] * (len(configs) - len(modes))
    assert [c.compile_mode for c in configs] == grid + modes
    for cfg in configs[len(configs) - len(modes):]:
        assert cfg == replace(base, compile=True, compile_mode=cfg.compile_mode)


def test_the_base_config_takes_the_width_and_batch_size_asked_for():
    """Every section's config starts at --width, --batch-size and --workers (a field `given`
    wins), on synthetic data of the section's images."""
    args = bench_options.parse_args(["--quick", "--width", "24", "--batch-size", "96",
                                     "--workers", "1"])
    args.device = "cpu"
    bench_options.fill_defaults(args)
    cfg = bench_setup.base_config(args, torch.device("cpu"), 300, "runs/x")
    assert (cfg.width, cfg.batch_size, cfg.workers, cfg.dataset) == (24, 96, 1, "synthetic")
    assert cfg.synthetic_size == (300, bench_options.TEST_IMAGES)
    assert bench_setup.base_config(args, torch.device("cpu"), 300, "runs/x",
                                      width=8).width == 8


def test_the_step_grid_times_each_configuration_once():
    """--batch-sizes naming --batch-size too adds no second row of the grid's configuration."""
    args = bench_options.parse_args(["--quick", "--batch-sizes", "64,32"])
    args.device = "cpu"
    bench_options.fill_defaults(args)
    base = bench_setup.base_config(args, torch.device("cpu"), 1_000, "runs/x")
    rows = [(c.precision, c.channels_last, c.compile, c.compile_mode, c.batch_size)
            for c in bench_sections.step_configs(base, args)]
    assert len(rows) == len(set(rows)) and {r[-1] for r in rows} == {64, 32}


def test_compile_off_alone_times_no_compiled_step_where_the_engine_compiles():
    """--compile off on CUDA, whose defaults compile: the other batch sizes and compile modes
    are timed as the grid is, uncompiled, not compiled after all."""
    args = bench_options.parse_args(["--compile", "off"])
    args.device = "cuda"
    bench_options.fill_defaults(args)
    base = bench_setup.base_config(args, torch.device("cuda"), 1_000, "runs/x")
    assert base.compile  # the engine's default there
    configs = bench_sections.step_configs(base, args)
    assert configs and not any(c.compile for c in configs)


@pytest.mark.parametrize("device, quick, extra", [
    ("cuda", False, [("resident", "default", True), ("resident", "reduce-overhead", False)]),
    ("cpu", False, []), ("cuda", True, [("resident", "default", False)])])
def test_the_epoch_section_times_the_default_loader_in_the_other_compile_modes(device, quick,
                                                                              extra):
    """On CUDA each loader's epoch runs on CUDA graphs, the engine's mode, and the default
    loader's again in the default mode: the first H200 run's configuration, in the same run;
    then without cuDNN's autotuning, which that run also went without."""
    args, base = listed_options(device, quick)
    configs = bench_sections.epoch_configs(base, args)
    assert [(c.loader, c.compile_mode, c.cudnn_benchmark) for c in configs] == (
        [(kind, base.compile_mode, True) for kind in loaders.LOADERS] + extra)
    assert base.compile_mode == ("reduce-overhead" if device == "cuda" and not quick
                                 else "default")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_an_untuned_cuda_epoch_runs_in_a_process_of_its_own(monkeypatch, device):
    """cuDNN reuses, for the life of a process, the plan it first ran for a convolution,
    autotuned or not: the row without autotuning, after the autotuned ones, would time their
    plans (bench_sections.bench_epoch_alone). The CPU has no cuDNN: every row stays here."""
    args, base = listed_options(device, quick=True)
    where = []

    def measured(place: str):
        def epoch(cfg: TrainConfig, epochs: int, threads: int) -> bench_sections.EpochResult:
            where.append((place, cfg.cudnn_benchmark))
            return bench_sections.EpochResult(cfg.loader, cfg.precision, cfg.compile,
                                              cfg.batch_size, cfg.width, status="failed")
        return epoch

    monkeypatch.setattr(bench_sections, "bench_epoch", measured("here"))
    monkeypatch.setattr(bench_sections, "bench_epoch_alone", measured("alone"))
    bench_sections.bench_epochs(base, args, lambda rows: None)
    alone = [("alone", False)] if device == "cuda" else []
    assert where == [("here", True)] * len(loaders.LOADERS) + alone


@pytest.mark.slow
def test_an_epoch_alone_is_measured_in_a_spawned_process_and_its_death_is_a_failed_row(
        prepared, tmp_path):
    """The row comes back over the pipe; a process that dies before it answers (here on an
    error bench_epoch does not catch: no steady epoch to take the fastest of) is a failed row
    naming its exit code, not a hang or a traceback here."""
    args, _ = listed_options("cpu", quick=True)
    cfg = replace(bench_setup.base_config(args, torch.device("cpu"), SYNTHETIC_SIZE[0],
                                             str(tmp_path / "run")),
                  data_dir=str(prepared.source.parent), synthetic_size=SYNTHETIC_SIZE, width=4,
                  batch_size=64, workers=1, loader="resident", cudnn_benchmark=False)
    row = bench_sections.bench_epoch_alone(cfg, 1, 1)
    assert (row.status, row.images, row.cudnn_benchmark) == ("ok", SYNTHETIC_SIZE[0], False)
    assert len(row.epoch_s) == 1 and row.step_only_s > 0
    died = bench_sections.bench_epoch_alone(cfg, 0, 1)
    assert died.status == "failed" and died.reason == (
        "its process ended with exit code 1 before it gave a result"), died


# bench_epoch_alone of the config given as JSON, for ever (epochs without end)
EPOCHS_ALONE = """
import json, sys
from engine.config import TrainConfig, field_value
from tools.bench_sections import bench_epoch_alone
cfg = TrainConfig(**{k: field_value(v) for k, v in json.loads(sys.argv[1]).items()})
bench_epoch_alone(cfg, 10**6, 1)
"""


def spawned_child(parent: int) -> int | None:
    """The pid of the child multiprocessing spawned from process `parent` (not its resource
    tracker), or None."""
    with suppress(OSError):
        return next((pid for pid, cmdline in children(parent) if b"spawn_main" in cmdline),
                    None)
    return None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="prctl and /proc are Linux's")
def test_an_epoch_alone_dies_with_a_parent_killed_outright(prepared, tmp_path):
    """The untuned row's process ignores the stop signals (its parent ends it): with its
    parent killed by the OOM killer or kill -9 it ran its epochs on, holding the GPU."""
    args, _ = listed_options("cpu", quick=True)
    cfg = replace(bench_setup.base_config(args, torch.device("cpu"), SYNTHETIC_SIZE[0],
                                             str(tmp_path / "run")),
                  data_dir=str(prepared.source.parent), synthetic_size=SYNTHETIC_SIZE, width=4,
                  batch_size=64, workers=1, loader="resident", cudnn_benchmark=False)
    parent = subprocess.Popen([sys.executable, "-c", EPOCHS_ALONE, json.dumps(asdict(cfg))],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        child = wait_until(lambda: spawned_child(parent.pid), 120,
                           "no process was spawned for the epochs", process=parent,
                           interval=0.05)
        time.sleep(5)  # into its epochs, as a rule (before them, it ends itself all the same)
    finally:
        parent.kill()
        parent.wait()
    try:
        wait_until(lambda: not running(child), 60, f"process {child} runs on without its parent",
                   interval=0.05)
    finally:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_list_option_with_a_value_of_the_wrong_kind_names_the_kind(tmp_path):
    result = run_script("tools/bench.py", "--quick", "--batch-sizes", "a,b", "--data-dir",
                        tmp_path / "data", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("error: argument --batch-sizes: invalid comma-separated int value: 'a,b'"
            in result.stderr.splitlines()[-1])


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_a_file_option_naming_a_folder_is_a_usage_error(tmp_path, capsys, option):
    """Before any section runs: --trace's was found after the profile had run."""
    with pytest.raises(SystemExit) as exit_info:
        bench_options.parse_args([option, str(tmp_path)])
    assert exit_info.value.code == 2
    name = "bench.json" if option == "--json" else "bench.trace.json.gz"
    assert f"{option} {tmp_path} is a folder; name a file, e.g. {tmp_path / name}; see --help" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_a_file_option_naming_a_pipe_is_a_usage_error(tmp_path, capsys, option):
    """A pipe stands in for /dev/null, which the rename at the end made a plain file."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SystemExit) as exit_info:
        bench_options.parse_args([option, str(tmp_path / "pipe")])
    assert exit_info.value.code == 2
    assert f"{option} {tmp_path / 'pipe'} is a device, pipe or socket" in capsys.readouterr().err
    # and where a folder of the file goes: not called a file
    with pytest.raises(SystemExit):
        bench_options.parse_args([option, str(tmp_path / "pipe" / "b.json")])
    assert (f"{option} {tmp_path / 'pipe' / 'b.json'}: {tmp_path / 'pipe'} is a device, pipe or "
            "socket, not a folder; ") in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_an_unwritable_output_is_a_usage_error(option, tmp_path, capsys):
    """Found before any section runs, not when the first one is written; a path under a
    regular file cannot be written, even by root."""
    (tmp_path / "file").write_text("a file, not a folder")
    path = tmp_path / "file" / "b.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_options.parse_args([option, str(path)])
    assert exit_info.value.code == 2
    assert f"{option} {path}: {tmp_path / 'file'} is a file, not a folder" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_an_output_naming_a_checkpoint_is_refused_and_leaves_it_whole(option, tmp_path):
    """--json is rewritten after each section: named at a run's ckpt.pt it replaced the
    checkpoint with JSON, where export refuses the same --out."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMAT}, ckpt)
    before = ckpt.read_bytes()
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", option, ckpt,
                        "--data-dir", tmp_path / "data", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"error: {option} {ckpt} is a cifar10-engine checkpoint; the results would "
            "overwrite it. Name another file") in result.stderr.splitlines()[-1]
    assert ckpt.read_bytes() == before and not (tmp_path / "data").exists()


def test_json_and_trace_may_name_folders_still_to_make(tmp_path, capsys):
    """Both writers make the folders above their file when they write it (write_trace since
    the trace beside --json needed them), so a new folder is fine for either; --trace's was
    refused as missing all the same. Nothing is made while the options are checked; a file
    where a folder goes is still refused before any section runs."""
    json_path = tmp_path / "new" / "deeper" / "b.json"
    assert bench_options.parse_args(["--json", str(json_path)]).json == json_path
    trace = tmp_path / "new" / "t.json.gz"
    assert bench_options.parse_args(["--trace", str(trace)]).trace == trace
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench_options.parse_args(["--trace", str(tmp_path / "file" / "t.json.gz")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_an_unwritable_json_stops_the_command_before_any_section(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", "--sections", "loaders",
                        "--data-dir", tmp_path / "data", "--json", tmp_path / "file" / "b.json",
                        timeout=300)
    assert result.returncode == 2 and "--json" in result.stderr.splitlines()[-1]
    assert result.stdout == "" and not (tmp_path / "data").exists()  # nothing measured


def test_train_flops_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 4*32*32 outputs, 3*3*3 MACs each
        nn.Flatten(),
        nn.Linear(4 * 32 * 32, 5),  # 4096*5
    )
    conv, linear = 2 * 4096 * 27, 2 * 4096 * 5  # forward FLOPs
    assert bench_mfu.hand_train_flops(forward_macs(net)) == 3 * (conv + linear)
    # counted as it runs: the first layer's backward skips the input's gradient (no one needs
    # it), so the conv costs 2x its forward and the linear 3x
    counted, by_module = count_train_flops(net)
    assert counted == 2 * conv + 3 * linear
    assert by_module == {"Sequential.0": 2 * conv, "Sequential.2": 3 * linear}


def test_counted_flops_agree_with_the_hand_count():
    # ResNet-18 at width 64: ~0.556 GMACs forward, so ~3.33 training GFLOPs per image
    for width in (16, 64):
        model = ResNet18(width=width)
        counted = count_train_flops(model)[0]
        assert counted == pytest.approx(6 * forward_macs(model), rel=0.02)
    assert counted == pytest.approx(3.33e9, rel=0.01)  # width 64's, the last counted
    # per top-level module (a nested one's FLOPs are its parent's): together, the total
    counted, by_module = count_train_flops(ResNet18(width=8))
    assert sorted(by_module) == [f"ResNet18.{name}" for name in
                                 ("fc", "layer1", "layer2", "layer3", "layer4", "stem")]
    assert sum(by_module.values()) == counted


def test_counting_flops_leaves_the_model_untouched():
    model = ResNet18(width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_train_flops(model)[0]
    assert all(p.grad is None for p in model.parameters())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_missing_peer_is_recorded_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "airbench", None)  # Python's own "not installed"
    row = bench_peers.PeerResult("airbench.CifarLoader", "peer", "flip")
    loader = bench_peers.construct(row, lambda: bench_peers.airbench_loader(
        None, TrainConfig(), None, tmp_path))
    assert loader is None and row.status == "not installed"
    assert "airbench" in row.reason and ".[bench]" in row.reason


@pytest.mark.parametrize("damage, error", [("missing", "FileNotFoundError"),
                                            ("empty", "IndexError")])
def test_a_peer_failing_in_its_own_way_is_a_failed_row_with_its_reason(prepared, tmp_path,
                                                                       damage, error):
    """Foreign code fails with errors of its own (stock FFCV on a .beton missing or empty: an
    OSError, an IndexError): its row says why, and the section goes on to the other loaders."""
    beton = tmp_path / "train.beton"
    if damage == "empty":
        beton.touch()
    row = bench_peers.PeerResult("stock ffcv.Loader", "peer", "flip")
    loader = bench_peers.construct(row, lambda: bench_peers.stock_ffcv_loader(
        replace(prepared, train=beton), TrainConfig(workers=1, precision="fp32"),
        torch.device("cpu")))
    assert loader is None and row.status == "failed" and row.reason.startswith(error)


def test_airbench_hands_over_every_image_of_the_split(prepared, tmp_path):
    """Its training default drops the last partial batch after augmenting it: 576 of these
    605 images were counted, and 64 of 100 at --images 100 --batch-size 64."""
    cfg = TrainConfig(batch_size=64, translate=2)
    loader = bench_peers.airbench_loader(prepared, cfg, torch.device("cpu"), tmp_path)
    assert sum(len(labels) for _, labels in loader) == 605


def test_airbench_leaves_cudnn_autotuning_as_it_was(prepared, tmp_path, monkeypatch):
    """airbench's modules set torch.backends.cudnn.benchmark = True when imported: every later
    measurement of the run (the seed vs default epochs on a GPU) would have autotuned."""
    for name in [m for m in sys.modules if m == "airbench" or m.startswith("airbench.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a bench run
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    bench_peers.airbench_loader(prepared, TrainConfig(batch_size=64), torch.device("cpu"),
                                tmp_path)
    assert "airbench.lib_airbench94" in sys.modules and torch.backends.cudnn.benchmark is False


def test_the_peer_loaders_are_saved_after_every_turn(prepared, tmp_path, monkeypatch):
    """A GPU step cut at its time limit keeps the turns it finished: the rows were saved only
    once the whole peers section was done."""
    lineup = bench_peers.lineup  # airbench and ours beside it: no FFCV compile here
    monkeypatch.setattr(bench_peers, "lineup", lambda *a: lineup(*a)[:2])
    monkeypatch.setattr(timing, "TURN_S", 0)  # one epoch a turn, to count the turns
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--epochs", "2"])
    bench_options.fill_defaults(args)
    saved = []
    rows = bench_peers.bench_peer_loaders(
        prepared, TrainConfig(batch_size=64, precision="fp32"), torch.device("cpu"), args,
        tmp_path, lambda rows: saved.append([asdict(r) for r in rows]))
    # each turn, then the profiled epoch after them (top_op: the host's op on the CPU)
    assert [[len(r["epoch_s"]) for r in turn] for turn in saved] == [[1, 1], [2, 2], [2, 2]]
    assert [[bool(r["top_op"]) for r in turn] for turn in saved] == [[False] * 2] * 2 + [[True] * 2]
    assert saved[0][1]["ratio"] > 0 and saved[-1] == [asdict(r) for r in rows]
    assert all(r.construct_s > 0 for r in rows)  # the peers table's construction column


def test_a_loaders_turn_repeats_its_epochs_until_they_fill_the_turn(prepared, monkeypatch):
    """On a GPU the resident loader's 50k-image epoch takes milliseconds: a turn times it many
    times, each epoch with its own number (so its own augmentations), but at most TURN_EPOCHS
    (here 3 epochs of 1 s of a clock only the loader moves, in a turn of 6 s); a loader whose
    epoch fills the turn (here: a turn of no time) runs once."""
    loader = resident_loader(prepared)
    passes = timing.loader_turn(loader, 5)
    assert 1 < len(passes) <= timing.TURN_EPOCHS
    assert sum(p.seconds for p in passes) >= timing.TURN_S or len(passes) == timing.TURN_EPOCHS
    assert loader.epoch == 5 + len(passes) - 1
    assert all(p.images == SYNTHETIC_SIZE[0] for p in passes)
    clock: list[float] = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "TURN_EPOCHS", 3)
    monkeypatch.setattr(timing, "TURN_S", 6.0)
    assert len(timing.loader_turn(ScriptedEpochs(loader, "resident", clock, {}, []), 0)) == 3
    monkeypatch.setattr(timing, "TURN_S", 0)
    assert len(timing.loader_turn(loader, 0)) == 1


def test_the_loaders_table_gives_the_batch_that_ran(prepared, monkeypatch):
    """A --batch-size over the split is the split, in each loader as in training; each loader
    takes --epochs turns (here of one epoch each)."""
    # two of them: ffcv's numba compilation would take the longest here
    monkeypatch.setattr(bench_sections, "LOADERS", ("resident", "torchvision"))
    monkeypatch.setattr(timing, "TURN_S", 0)  # one epoch a turn, to count the turns
    cfg = TrainConfig(dataset="synthetic", data_dir=str(prepared.source.parent),
                      synthetic_size=SYNTHETIC_SIZE, batch_size=4096, precision="fp32",
                      workers=1)
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--epochs", "2"])
    bench_options.fill_defaults(args)
    args.threads, threads = 1, torch.get_num_threads()
    torch.set_num_threads(2)  # as FFCV leaves them: the section sets --threads again
    try:
        rows = bench_sections.bench_loaders(cfg, torch.device("cpu"), args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert [(r.status, r.batch_size, len(r.epoch_s)) for r in rows] == [
        ("ok", SYNTHETIC_SIZE[0], 2)] * 2
    assert all(r.construct_s > 0 for r in rows)  # the loaders table's construction column
    # each against torchvision's, which is 1
    assert [r.vs_torchvision for r in rows] == pytest.approx(
        [rows[0].images_per_s / rows[1].images_per_s, 1])


def test_stock_ffcv_with_more_workers_than_numba_may_start_is_a_failed_row(prepared):
    """The peer's row carries the same one-line reason as our ffcv loader, not numba's."""
    from numba import config

    too_many = config.NUMBA_NUM_THREADS + 1
    row = bench_peers.PeerResult("stock ffcv.Loader", "peer", "flip")
    loader = bench_peers.construct(row, lambda: bench_peers.stock_ffcv_loader(
        prepared, TrainConfig(workers=too_many, precision="fp32"), torch.device("cpu")))
    assert loader is None and row.status == "failed"
    assert row.reason == (f"LoaderError: --workers {too_many}: FFCV's workers are numba threads, "
                          f"and numba may start {config.NUMBA_NUM_THREADS} here (NUMBA_NUM_THREADS,"
                          " by default the cores this process may use); pass --workers "
                          f"{config.NUMBA_NUM_THREADS} or fewer.")


def test_a_precision_faster_than_its_matmul_peak_gets_no_mfu():
    """A CPU without bf16 instructions runs torch's bf16 matmul far slower than its bf16
    convolutions: a step's MFU of 650% then only said that the peak was no peak."""
    steps = [bench_sections.StepResult(precision, "channels_last", False, 64, 16,
                                       images_per_s=speed)
             for precision, speed in (("fp32", 100.0), ("bf16", 10.0), ("bf16", 100.0))]
    peaks = {dtype: Peak(dtype, 1, 1, [1], flops, dtype)
             for dtype, flops in (("fp32", 1e6), ("bf16", 5e4))}
    # a step skipped here (fp16 on a CPU) has no throughput, and no peak was measured for it
    skipped = bench_sections.StepResult("fp16", "channels_last", False, 64, 16,
                                        status="skipped")
    rows, outpaced = bench_mfu.mfu_rows({"step": [*steps, skipped]}, 1000, peaks)
    assert [row["mfu"] for row in rows] == [pytest.approx(0.1), None, None]
    assert outpaced == ["bf16"]


def test_only_the_precisions_that_ran_get_a_matmul_peak(monkeypatch):
    """A failed epoch row (bf16 on a machine that cannot run it) has no throughput: its
    precision's matmul peak was measured all the same, seconds of --matmul-seconds per block
    for a peak no row uses; a skipped step's was not. Both are left out now."""
    measured = []

    def peak(dtype, device, n, seconds, blocks):
        measured.append(dtype)
        return Peak(dtype, n, 1, [1.0], 1e9, dtype)

    monkeypatch.setattr(bench_mfu, "matmul_peak", peak)
    failed_epoch = bench_sections.EpochResult("resident", "bf16", False, 64, 4, status="failed")
    skipped_step = bench_sections.StepResult("fp16", "channels_last", False, 64, 4,
                                             status="skipped")
    args = SimpleNamespace(threads=torch.get_num_threads(), matmul_size=8, matmul_seconds=0.01,
                           repeats=1)
    out = bench_mfu.bench_mfu({"epoch": [failed_epoch], "step": [skipped_step]},
                              TrainConfig(width=4), torch.device("cpu"), args)
    assert measured == ["fp32"] and out.rows == []
    # a step that ran in bf16 gets its peak, and its row an MFU against it
    measured.clear()
    ran = bench_sections.StepResult("bf16", "channels_last", False, 64, 4, images_per_s=10.0)
    out = bench_mfu.bench_mfu({"epoch": [failed_epoch], "step": [skipped_step, ran]},
                              TrainConfig(width=4), torch.device("cpu"), args)
    assert measured == ["bf16", "fp32"] and [row["precision"] for row in out.rows] == ["bf16"]


def test_a_peer_epochs_mfu_rests_on_the_flops_of_its_own_model():
    """The peers' epochs train at --peer-width, the other sections at --width: each peer
    epoch's MFU takes the FLOPs counted on its own model, not the section's."""
    epochs = [bench_peers.SeedEpochResult(pipeline, "torchvision", "fp32", False, False, 64,
                                          width, 512, flops, 1.0, [1.0], 100.0)
              for pipeline, width, flops in (("seed", 16, 1000), ("default", 64, 4000))]
    peaks = {"fp32": Peak("fp32", 1, 1, [1], 1e9, "fp32")}
    rows, _ = bench_mfu.mfu_rows({"peers": {"epochs": epochs}}, 7, peaks)
    assert [row["achieved_flops_per_s"] for row in rows] == [1e5, 4e5]
    assert [row["mfu"] for row in rows] == [pytest.approx(1e-4), pytest.approx(4e-4)]


def test_the_two_rows_of_ours_beside_airbench_log_distinct_lines():
    """The resident loader beside airbench's, in its fp16 and then in the training dtype, was
    logged twice as 'resident (flip, translate 2 reflect)': the lines now name the output,
    as the table and the GPU summary do."""
    rows = [bench_peers.PeerResult("resident", "ours", "flip, translate 2 reflect",
                                   output=f"{dtype} 3x32x32 channels_last", images_per_s=10.0)
            for dtype in ("float16", "float32")]
    lines = [bench_peers.peer_line(row) for row in rows]
    assert lines[0] != lines[1]
    assert lines[0] == ("peers: resident (flip, translate 2 reflect; float16 3x32x32 "
                        "channels_last): 10 images/s")


def test_a_peer_row_that_never_ran_is_named_by_its_augmentation_alone():
    """A peer not installed has no output to name: its line gives its loader and augmentation,
    with no empty part after them, then why."""
    row = bench_peers.PeerResult("airbench", "peer", "flip, translate 2 reflect",
                                 status="not installed", reason="pip install airbench")
    assert bench_peers.peer_line(row) == ("peers: airbench (flip, translate 2 reflect): not "
                                          "installed, pip install airbench")


def test_each_row_of_ours_is_scored_against_the_peer_it_is_set_beside():
    """Ours over the peer, as its line says (2.5x: ours is faster); beside a peer that failed
    there is no ratio, and scoring goes on instead of dividing by its missing figure."""
    rows = [bench_peers.PeerResult("airbench.CifarLoader", "peer", "flip", images_per_s=100.0),
            bench_peers.PeerResult("resident", "ours", "flip", images_per_s=250.0,
                                   versus="airbench.CifarLoader"),
            bench_peers.PeerResult("ffcv", "ours", "flip", status="failed",
                                   versus="airbench.CifarLoader"),
            bench_peers.PeerResult("stock ffcv.Loader", "peer", "flip", status="failed"),
            bench_peers.PeerResult("ffcv", "ours", "flip", images_per_s=300.0,
                                   versus="stock ffcv.Loader")]
    bench_peers.score(rows)
    assert [row.ratio for row in rows] == [None, 2.5, None, None, None]
    assert bench_peers.peer_line(rows[1]).endswith(": 250 images/s, 2.50x airbench.CifarLoader")
    assert bench_peers.peer_line(rows[4]).endswith(": 300 images/s")


def test_the_seed_epoch_is_the_seed_preset_as_typed_and_the_default_its_own_batch(tmp_path):
    """On a GPU the seed notebook's epoch is `--preset seed --loader torchvision --precision
    fp32 --no-compile --no-channels-last` at width 64, and the default preset's epoch takes its
    own batch size, not --batch-size: one option off and the figure is another pipeline's."""
    args = bench_options.parse_args(["--device", "cuda", "--data-dir", str(tmp_path),
                                     "--batch-size", "100", "--workers", "1"])
    bench_options.fill_defaults(args)
    seed, default = bench_peers.seed_configs(args, torch.device("cuda"), str(tmp_path))

    def typed(*given: str) -> TrainConfig:
        common = ["--dataset", "synthetic", "--data-dir", str(tmp_path), "--synthetic-size",
                  "50000", str(bench_options.TEST_IMAGES), "--workers", "1", "--out",
                  str(tmp_path), "--width", "64"]
        return resolve(engine.options.parse([*common, *given]).cfg, True, bf16=native_bf16())

    assert seed == typed("--preset", "seed", "--loader", "torchvision", "--precision", "fp32",
                         "--no-compile", "--no-channels-last")
    assert default == typed()


def test_the_seed_and_default_epochs_are_rated_from_their_own_fastest_epochs(tmp_path):
    """Each pipeline's row: its name, the batch that ran (the default's 512 capped at the 300
    images), as many steady epochs as asked, images/s of the fastest, and its speed over the
    seed's (the default's figure a user quotes as 'Nx the seed notebook')."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                                     "--epochs", "2", "--workers", "1",
                                     "--peer-epoch-images", "300", "--peer-width", "4"])
    bench_options.fill_defaults(args)
    seed, default = bench_peers.bench_seed_epochs(args, torch.device("cpu"), str(tmp_path))
    assert [(r.pipeline, r.loader, r.batch_size, r.width, r.images) for r in (seed, default)] == [
        ("seed", "torchvision", 128, 4, 300), ("default", "ffcv", 300, 4, 300)]
    for r in (seed, default):
        assert len(r.epoch_s) == 2 and r.images_per_s == 300 / min(r.epoch_s)
    assert seed.vs_seed == 1 and default.vs_seed == default.images_per_s / seed.images_per_s


def test_a_matmul_peak_leaves_tf32_matmuls_as_it_found_them():
    """The fp32 peak turns TF32 on or off for its own products only: the sections after it
    (a step, an epoch) run with the setting the engine chose."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for setting in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = setting
            peak = timing.matmul_peak("fp32", torch.device("cpu"), 16, 0.001, 2)
            assert peak.math == "fp32" and torch.backends.cuda.matmul.allow_tf32 is setting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_mfu_table_gives_the_figures_of_the_json_in_tflops():
    """The printed MFU row is its JSON row: 1000 images/s x 3.33 GFLOPs = 3.33 TFLOP/s, a
    third of a 10 TFLOP/s peak (the JSON keeps FLOP/s, the table TFLOP/s)."""
    step = bench_sections.StepResult("fp32", "channels_last", False, 64, 16,
                                     images_per_s=1000.0)
    peaks = {"fp32": Peak("fp32", 1024, 4, [0.5], 10e12, "fp32")}
    rows, _ = bench_mfu.mfu_rows({"step": [step]}, 3_330_000_000, peaks)
    assert (rows[0]["achieved_flops_per_s"], rows[0]["peak_flops_per_s"]) == (3.33e12, 10e12)
    assert rows[0]["mfu"] == pytest.approx(0.333)
    mfu = bench_mfu.MfuResult(3_330_000_000, {}, 555_000_000, 3_330_000_000, peaks=peaks,
                              rows=rows)
    (line,) = [line for line in bench_output.report({"mfu": mfu}).splitlines()
               if line.lstrip().startswith("step ")]
    assert line.split()[-4:] == ["1,000.0", "3.33", "10", "0.333"]
    assert line.split()[1:-4] == ["fp32", "channels_last", "eager", "batch", "64"]


@pytest.mark.slow
def test_a_run_cut_short_keeps_the_sections_it_finished(tmp_path):
    """--json is rewritten after each section and after each step configuration: Ctrl-C (or
    a GPU step's time limit) during the second section leaves the first one's figures and the
    second one's rows so far, marked incomplete."""
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--device", "cpu",
         "--sections", "loaders,step", "--data-dir", str(tmp_path / "data"), "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # a configuration's line is logged after --json was written
        if line.startswith("step:"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    report = json.loads(out.read_text())
    assert report["meta"]["complete"] is False and list(report["meta"]["section_s"]) == ["loaders"]
    assert {r["loader"] for r in report["loaders"]} == {"ffcv", "resident", "torchvision"}
    assert report["step"][0]["status"] == "ok" and report["step"][0]["images_per_s"] > 0


class FailsAfterWarmup:
    """A real loader whose second epoch raises LoaderError, as a dying FFCV pipeline does."""

    def __init__(self, loader):
        self.loader, self.device, self.epoch = loader, loader.device, 0
        self.batch_size = loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        if self.epoch:
            raise LoaderError("the pipeline thread died")
        return iter(self.loader)


def test_a_loader_that_fails_is_recorded_and_the_others_are_measured(monkeypatch, tmp_path):
    """One broken CUDA path must not cost a GPU run the other loaders' figures: a loader
    failing mid-section (loaders) or at construction (epoch) is a failed row, the rest run."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                             "--images", "256", "--epoch-images", "128", "--workers", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # settle_device's, undone after the test
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    monkeypatch.setattr(bench_sections, "LOADERS", ("resident", "torchvision"))  # no numba JIT
    real = engine.run.make_loader
    monkeypatch.setattr(engine.run, "make_loader", lambda kind, *a, **k: (
        FailsAfterWarmup(real(kind, *a, **k)) if kind == "resident" else real(kind, *a, **k)))
    rows = {r.loader: r for r in bench_sections.bench_loaders(
        bench_setup.base_config(args, device, 256, str(tmp_path)), device, args)}
    assert (rows["resident"].status, rows["resident"].images_per_s) == ("failed", None)
    assert rows["resident"].reason == "LoaderError: the pipeline thread died"
    assert rows["torchvision"].status == "ok" and rows["torchvision"].vs_torchvision == 1

    # torchvision's own failure leaves the others measured, with nothing to compare them to
    monkeypatch.setattr(engine.run, "make_loader", lambda kind, *a, **k: (
        FailsAfterWarmup(real(kind, *a, **k)) if kind == "torchvision" else real(kind, *a, **k)))
    rows = {r.loader: r for r in bench_sections.bench_loaders(
        bench_setup.base_config(args, device, 256, str(tmp_path)), device, args)}
    assert rows["torchvision"].status == "failed" and rows["resident"].status == "ok"
    assert rows["resident"].images_per_s > 0 and rows["resident"].vs_torchvision is None

    def refuse(kind, *a, **k):
        if kind == "resident":
            raise LoaderError("cannot hold the split on the device")
        return real(kind, *a, **k)

    monkeypatch.setattr(engine.run, "make_loader", refuse)
    saved = []
    epochs = bench_sections.bench_epochs(
        bench_setup.base_config(args, device, 128, str(tmp_path)), args,
        lambda rows: saved.append(len(rows)))
    assert [(r.loader, r.status) for r in epochs] == [("resident", "failed"),
                                                      ("torchvision", "ok")]
    assert "cannot hold the split" in epochs[0].reason and epochs[1].images_per_s > 0
    assert saved == [1, 2]  # the rows so far, after each loader
    rows, _ = bench_mfu.mfu_rows({"epoch": epochs}, 1, {"fp32": Peak("fp32", 1, 1, [1], 1e9,
                                                                          "fp32")})
    assert [row["config"].split()[0] for row in rows] == ["torchvision"]  # failed: no MFU


class FailsFromEpoch(FailsAfterWarmup):
    """A real loader that fails from epoch `last + 1` on: after some turns of steady epochs."""

    def __init__(self, loader, last: int):
        super().__init__(loader)
        self.last = last

    def __iter__(self):
        if self.epoch > self.last:
            raise LoaderError("the pipeline thread died")
        return iter(self.loader)


def test_each_turn_goes_on_from_the_epochs_before_and_a_late_failure_keeps_no_figure(
        prepared, monkeypatch):
    """Every turn's epochs have numbers of their own (their own augmentations: each turn
    restarted at epoch 1); a loader failing in a later turn is a failed row without the
    images/s of its earlier turns."""
    monkeypatch.setattr(timing, "TURN_S", 0)  # one epoch a turn

    steady, failing = resident_loader(prepared), FailsFromEpoch(resident_loader(prepared), last=1)
    rows = [bench_peers.PeerResult(name, "ours", "flip") for name in ("steady", "failing")]
    running = timing.take_turns([(rows[0], steady), (rows[1], failing)], 3, (LoaderError,))
    assert [row for row, _ in running] == [rows[0]]
    assert steady.epoch == 3 and len(rows[0].epoch_s) == 3 and rows[0].images_per_s > 0
    assert (rows[1].status, rows[1].reason, rows[1].epoch_s, rows[1].images_per_s) == (
        "failed", "LoaderError: the pipeline thread died", None, None)


def resident_loader(prepared: Prepared) -> BatchLoader:
    """The resident loader of the prepared synthetic train split, as training augments it."""
    return loaders.make_loader("resident", prepared.train, train=True, batch_size=64,
                               device="cpu", mean=prepared.mean, std=prepared.std,
                               augment=TrainConfig().augment())


class ScriptedEpochs(FailsFromEpoch):
    """A real loader whose epoch `e` takes `seconds[e]` (1 if not given) of a clock only it
    moves, logging (its name, the epoch) as each epoch starts; it fails from `last + 1` on."""

    def __init__(self, loader: BatchLoader, name: str, clock: list[float],
                 seconds: dict[int, float], log: list[tuple[str, int]], last: int = 10**6):
        super().__init__(loader, last)
        self.name, self.clock, self.seconds, self.log = name, clock, seconds, log

    def __iter__(self):
        self.log.append((self.name, self.epoch))
        yield from super().__iter__()
        self.clock[0] += self.seconds.get(self.epoch, 1.0)


def test_a_loaders_row_gives_its_epochs_and_the_images_per_s_of_the_fastest(prepared,
                                                                            monkeypatch):
    """The loaders table's figures are what they say: the warm-up's seconds apart, each steady
    epoch of the turn (as many as fill TURN_S), and images/s of the fastest of them, not of
    the last or of their sum. A clock only the loader moves makes the seconds exact."""
    clock: list[float] = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "TURN_S", 6.0)  # epochs 1 to 3 fill it: 3 + 1 + 2 s
    loader = ScriptedEpochs(resident_loader(prepared), "resident", clock,
                            {0: 10.0, 1: 3.0, 2: 1.0, 3: 2.0}, [])
    row, firsts = bench_peers.PeerResult("resident", "ours", "flip"), []
    assert timing.take_turns([(row, loader)], 1, (LoaderError,),
                             on_first=lambda r, images: firsts.append((r, len(images)))
                             ) == [(row, loader)]
    assert firsts == [(row, 64)]  # the warm-up's first batch, once: what describes the output
    assert (row.images, row.first_epoch_s, row.epoch_s, row.images_per_s) == (
        SYNTHETIC_SIZE[0], 10.0, [3.0, 1.0, 2.0], SYNTHETIC_SIZE[0] / 1.0)


def test_loaders_take_turns_and_one_that_fails_costs_the_others_none(prepared, monkeypatch):
    """A burst of load on a shared machine must hit every loader alike: each turn runs one
    epoch of each in order, and a loader failing mid-run leaves the ones after it every turn
    (removing it while going through the turn's loaders skipped the next one)."""
    clock: list[float] = [0.0]
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "TURN_S", 0)  # one epoch a turn
    entrants = [(bench_peers.PeerResult(name, "ours", "flip"),
                 ScriptedEpochs(resident_loader(prepared), name, clock, {}, log, last))
                for name, last in (("failing", 1), ("a", 10**6), ("b", 10**6))]
    running = timing.take_turns(entrants, 3, (LoaderError,))
    assert [row.loader for row, _ in running] == ["a", "b"]
    assert log == [(name, epoch) for epoch in range(4) for name in ("failing", "a", "b")
                   if (name, epoch) != ("failing", 3)]
    assert [row.epoch_s for row, _ in entrants] == [None, [1.0] * 3, [1.0] * 3]


class ClaimsDevice:
    """A real loader or accelerator that says its work is on `device`: all that the timing
    functions read of it to know which device to wait for (there is no GPU here)."""

    def __init__(self, real, device: torch.device):
        self.real, self.device = real, device

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def __iter__(self):
        return iter(self.real)


def test_timed_work_is_waited_for_on_the_device_before_each_clock_read(prepared, monkeypatch,
                                                                      tmp_path):
    """A GPU runs its queue after the host moves on: a loader epoch, a training epoch and a
    block of steps each wait for the device before they start the clock and before they stop
    it, or the figure times the queueing, or the work queued before it. A training epoch
    trains in train mode, whatever mode the model was left in."""
    run = bench_setup.make_run(quick_resident_config(monkeypatch, tmp_path, 128), 1)
    batch = next(iter(run.train_loader))
    cuda, events = torch.device("cuda:0"), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(device))
    monkeypatch.setattr(timing, "time", SimpleNamespace(
        perf_counter=lambda: events.append("clock") or 0.0))
    run.accelerator = ClaimsDevice(run.accelerator, cuda)
    loader = ClaimsDevice(resident_loader(prepared), cuda)
    run.model.eval()
    for timed in (lambda: timing.loader_pass(loader, 0), lambda: timing.train_pass(run, 1),
                  lambda: timing.timed_steps(run, repeat(batch), 2)):
        events.clear()
        timed()
        assert events[:2] == events[-2:] == [cuda, "clock"] and events.count(cuda) == 2
    assert run.model.training


class CountedMatmuls(TorchFunctionMode):
    """Counts the torch.matmul calls made inside it, running each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.matmul
        return func(*args, **(kwargs or {}))


def test_a_matmul_peak_is_the_flops_of_its_fastest_block():
    """MFU's denominator: 2 n^3 FLOPs a product, times the products a block times (every one
    of them run), over the fastest of the blocks asked for."""
    with CountedMatmuls() as products:
        peak = timing.matmul_peak("fp32", torch.device("cpu"), 64, 0.01, 3)
    assert len(peak.block_s) == 3 and peak.reps >= 3
    assert products.count == 2 + 3 * peak.reps  # a warm-up and a calibration, then the blocks
    assert peak.flops_per_s == pytest.approx(2 * 64**3 * peak.reps / min(peak.block_s))


class FirstBatchLate:
    """A real loader whose epochs' first batch takes `late` seconds of a clock (FFCV starting
    its pipeline thread)."""

    def __init__(self, loader, clock: list[float], late: float):
        self.loader, self.clock, self.late = loader, clock, late
        self.batch_size = loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        self.clock[0] += self.late  # on the first next(), as this is a generator
        yield from self.loader


def test_a_training_epochs_first_wait_is_its_first_batchs(monkeypatch, tmp_path):
    """The epoch line's first-batch wait (an epoch's start-up) is the wait for its first batch,
    not for the end of its batches. A clock only the loader moves makes the waits exact."""
    cfg = quick_resident_config(monkeypatch, tmp_path, 200)
    run = bench_setup.make_run(cfg, 1)
    clock = [0.0]
    run.train_loader = FirstBatchLate(run.train_loader, clock, 5.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    result = timing.train_pass(run, 3)
    assert (result.images, result.first_wait_s, result.wait_s, result.seconds) == (
        200, 5.0, 5.0, 5.0)
    assert run.train_loader.loader.epoch == 3  # its own order and augmentations


class LosesAStop(FailsAfterWarmup):
    """A real loader whose second epoch drops a SIGTERM (raised in a finalizer, as in an
    at-fork hook while the torchvision loader forks its workers) and then fails, as those
    workers, killed by the same signal, make it fail."""

    def __iter__(self):
        if self.epoch:
            SignalsWhenCollected()
            raise LoaderError("a worker died")
        return iter(self.loader)


def test_a_stop_signal_lost_in_a_loader_pass_stops_the_loaders_section(monkeypatch, tmp_path):
    """The failure a lost SIGTERM left behind was recorded as the loader's, and the other
    loaders took their turns on, as many as --epochs: the command ran on after `timeout`."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                                     "--images", "256", "--epochs", "3", "--workers", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    monkeypatch.setattr(bench_sections, "LOADERS", ("resident", "torchvision"))
    real, real_turn, turns = engine.run.make_loader, timing.loader_turn, []
    monkeypatch.setattr(engine.run, "make_loader", lambda kind, *a, **k: (
        LosesAStop(real(kind, *a, **k)) if kind == "resident" else real(kind, *a, **k)))
    monkeypatch.setattr(timing, "loader_turn", lambda loader, epoch: (
        turns.append(type(loader).__name__) or real_turn(loader, epoch)))
    cfg = bench_setup.base_config(args, device, 256, str(tmp_path))
    assert run_main(lambda: bench_sections.bench_loaders(cfg, device, args)) == 143
    assert turns == ["LosesAStop"]  # no turn after the one the signal stopped


def test_a_stop_signal_lost_in_the_collection_between_configurations_stops_the_bench() -> None:
    """release() collects the previous configuration's garbage: a stop signal handled in a
    finalizer that collection runs is dropped by Python there, and release raises it again,
    so no next configuration is built (the command went on after `timeout`)."""
    went_on = []

    def body() -> int:
        cycle = [SignalsWhenCollected()]
        cycle.append(cycle)  # freed by a collection, not by its count of references
        del cycle
        bench_setup.release()
        went_on.append(True)
        return 0

    assert run_main(body) == 143
    assert went_on == []


def test_a_fresh_run_compiles_anew_not_from_the_graphs_compiled_before(monkeypatch, tmp_path):
    """make_run empties torch.compile's caches: each configuration's model must not run on
    the graphs compiled for the one before it. A function compiled between two make_runs is
    compiled again after the second (the first sets the global state compiled code is
    guarded on, which alone would have it compiled again)."""
    compiled = []

    def backend(graph: torch.fx.GraphModule, inputs: list) -> Callable:
        compiled.append(graph)
        return graph.forward

    cfg = quick_resident_config(monkeypatch, tmp_path, 64)
    bench_setup.make_run(cfg, 1)
    double = torch.compile(lambda x: x * 2, backend=backend)
    double(torch.ones(3))
    double(torch.ones(3))
    assert len(compiled) == 1  # the second call ran the graph compiled for the first
    bench_setup.make_run(cfg, 1)
    double(torch.ones(3))
    assert len(compiled) == 2


@pytest.mark.slow
def test_sigterm_to_the_group_amid_torchvision_workers_prints_one_line(tmp_path):
    """`timeout` sends SIGTERM to the whole process group, the DataLoader's workers too: they
    died of it, and the parent then printed 'Exception ignored in: ..._MultiProcessingDataLoader
    Iter.__del__ ... is killed by signal: Terminated.' after its line."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--device", "cpu",
         "--sections", "loaders", "--epochs", "99999999999", "--data-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_until(lambda: data_workers(proc.pid), 300, "no worker started", process=proc,
                   interval=0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # which process is still there, and where it waits
            left = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:24,args", "-g",
                                   str(proc.pid)], capture_output=True, text=True).stdout
            pytest.fail(f"still running 120 s after SIGTERM (parent's status {proc.poll()}):\n"
                        f"{left}")
    finally:
        with suppress(ProcessLookupError):  # the parent and any worker it left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and stderr.strip() == "interrupted", stderr[-3000:]


def test_a_step_the_engine_refuses_is_skipped_and_one_that_breaks_is_failed(monkeypatch,
                                                                           tmp_path):
    """fp16 on a CPU cannot run here (skipped); out of memory or a failed compile in a step on
    a GPU is what the step grid is there to find (failed: the command exits 1)."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                             "--images", "256"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    base = replace(bench_setup.base_config(args, device, 64, str(tmp_path)), loader="resident")
    refused = bench_sections.bench_step(replace(base, precision="fp16"), args)
    assert (refused.status, refused.images_per_s) == ("skipped", None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_sections, "timed_steps", out_of_memory)
    broken = bench_sections.bench_step(base, args)
    assert (broken.status, broken.images_per_s) == ("failed", None)
    assert broken.reason.startswith("OutOfMemoryError: CUDA out of memory")

    def pipeline_died(*args):
        raise LoaderError("the pipeline thread died")

    # an error of the engine's that is no refusal of the configuration: a failure too
    monkeypatch.setattr(bench_sections, "timed_steps", pipeline_died)
    died = bench_sections.bench_step(base, args)
    assert (died.status, died.reason) == ("failed", "LoaderError: the pipeline thread died")
    assert bench_run.failed({"step": [asdict(refused), asdict(broken)]}) == 1


def test_a_step_batch_beyond_the_split_is_counted_as_the_batch_that_ran(monkeypatch, tmp_path):
    """--batch-size 400 over 100 images steps on batches of 100: images/s counts those, not
    400 a step (a 4x overstatement, MFU with it), and the row says so."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                             "--batch-size", "400", "--workers", "1", "--repeats", "2"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    base = replace(bench_setup.base_config(args, device, 100, str(tmp_path)), loader="resident")
    row = bench_sections.bench_step(base, args)
    assert row.status == "ok" and row.batch_size == 100 and len(row.block_s) == 2
    assert row.warmup_s > 0 and row.steps == args.steps
    # of the fastest block (--repeats 2: two blocks, one the faster)
    assert row.images_per_s == pytest.approx(args.steps * 100 / min(row.block_s))


@pytest.mark.parametrize("option, value", [("--matmul-size", "1000000"), ("--width", "100000")])
def test_an_mfu_section_out_of_memory_names_the_option(tmp_path, capsys, option, value):
    """A 10^6 x 10^6 matmul (4 TB) or a model of width 10^5 does not fit: one line naming the
    option, not the CPU allocator's traceback."""
    code = bench.main(["--quick", "--device", "cpu", "--sections", "mfu", option, value,
                       "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: out of memory ")
    assert err.splitlines()[-1].endswith(f"choose a smaller {option}.")


def test_failed_peer_epochs_count_as_a_failure():
    assert bench_run.failed({"peers": {"loaders": [], "epochs": [], "epochs_failed": "x"}}) == 1
    assert bench_run.failed({"peers": {"loaders": [], "epochs": []}}) == 0


def test_seed_epochs_that_cannot_run_leave_the_peer_loaders_and_say_why(tmp_path, monkeypatch):
    """The seed vs default epochs train on data of their own size: where it cannot be read (a
    damaged folder), the section keeps the loaders' rows it measured, names the file in
    `epochs_failed`, its log line and its table, and the run counts as failed."""
    lineup = bench_peers.lineup  # airbench and ours beside it: no FFCV compile here
    monkeypatch.setattr(bench_peers, "lineup", lambda *a: lineup(*a)[:2])
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--epochs", "1",
                                     "--data-dir", str(tmp_path / "data"), "--workers", "1",
                                     "--peer-epoch-images", "300", "--peer-width", "4"])
    bench_options.fill_defaults(args)
    damaged = tmp_path / "data" / synthetic_folder_name(300, bench_options.TEST_IMAGES)
    damaged.mkdir(parents=True)
    device, lines = torch.device("cpu"), []
    cfg = bench_setup.base_config(args, device, SYNTHETIC_SIZE[0], str(tmp_path / "out"),
                                     precision="fp32")
    peers = bench_peers.bench_peers(cfg, device, args, str(tmp_path / "out"), lambda rows: None,
                                    lines.append)
    assert [r.status for r in peers["loaders"]] == ["ok", "ok"] and peers["epochs"] == []
    why = f"DataError: {damaged / 'batches.meta'} is missing. Delete {damaged}"
    assert peers["epochs_failed"].startswith(why)
    assert lines[-1] == f"peers: the seed vs default epochs failed: {peers['epochs_failed']}"
    assert f"failed: {why}" in bench_output.report({"peers": peers})
    assert bench_run.failed({"peers": peers}) == 1


def quick_resident_config(monkeypatch, tmp_path: Path, images: int) -> TrainConfig:
    """The config a `--quick --device cpu` bench epoch trains, on the resident loader."""
    args = bench_options.parse_args(["--quick", "--device", "cpu", "--data-dir", str(tmp_path),
                             "--workers", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # settle_device's, undone after the test
    device = bench_run.settle_device(args)
    bench_options.fill_defaults(args)
    return replace(bench_setup.base_config(args, device, images, str(tmp_path)),
                   loader="resident")


def test_the_step_only_reference_takes_the_epochs_own_steps(monkeypatch, tmp_path):
    """The loader-overhead share compares an epoch with the same steps on one batch: its full
    batches and its partial last one, which the loader must not be charged for."""
    cfg = quick_resident_config(monkeypatch, tmp_path, 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as FFCV leaves them: a run is built at the threads asked for
    try:
        run = bench_setup.make_run(cfg, 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    images, labels = next(iter(run.train_loader))
    sizes = []
    run.unwrapped.register_forward_pre_hook(lambda module, inputs: sizes.append(len(inputs[0])))
    assert timed_epoch_steps(run, images, labels, 150) > 0
    assert sizes == [64, 64, 22]  # as an epoch of 150 images at batch 64 steps
    sizes.clear()
    timed_epoch_steps(run, images, labels, 128)
    assert sizes == [64, 64]  # no partial batch, so no step of none


def test_the_first_batch_waits_are_one_figure_when_they_round_alike():
    """The epoch line's first-batch waits: a range from the least to the most, one figure
    where both round to the same tenth of a millisecond."""
    assert bench_sections.ms_range([0.00314, 0.00306]) == "3.1"
    assert bench_sections.ms_range([0.0042, 0.0031, 0.0035]) == "3.1-4.2"


def test_an_epoch_batch_beyond_the_split_is_counted_as_the_batch_that_ran(monkeypatch,
                                                                         tmp_path):
    """--batch-size 4096 over 128 images trains batches of 128, as training does: the epoch row
    gives the batch that ran, as the step and loaders rows do."""
    cfg = replace(quick_resident_config(monkeypatch, tmp_path, 128), batch_size=4096)
    row = bench_sections.bench_epoch(cfg, 1, 1)
    assert (row.status, row.batch_size, row.images) == ("ok", 128, 128), row.reason


def test_an_epoch_row_rates_the_fastest_epoch_and_sets_fastest_against_fastest(monkeypatch,
                                                                             tmp_path):
    """The epoch table's figures: the warm-up apart, each steady epoch's seconds and waits,
    images/s and the data-wait share of the fastest epoch (not of the last). Real epochs run;
    their figures are scripted, so which one is fastest is known. The step-only time was one
    pass against the fastest of the epochs: a minimum on one side only, which pushed the
    loader-overhead share down (negative in the dry run)."""
    cfg = quick_resident_config(monkeypatch, tmp_path, 128)
    passes, real_pass = [], bench_sections.train_pass
    # (seconds, wait, first batch's wait) of the warm-up, then of the 3 steady epochs
    scripted = iter([(9.0, 3.0, 2.0), (2.0, 0.5, 0.1), (1.0, 0.2, 0.05), (4.0, 0.1, 0.02)])

    def train_pass(run, epoch: int) -> timing.Pass:
        return timing.Pass(real_pass(run, epoch).images, *next(scripted))

    def timed(*a) -> float:
        passes.append(timed_epoch_steps(*a))
        return passes[-1]

    monkeypatch.setattr(bench_sections, "train_pass", train_pass)
    monkeypatch.setattr(bench_sections, "timed_epoch_steps", timed)
    row = bench_sections.bench_epoch(cfg, 3, 1)
    assert row.status == "ok" and len(passes) == 3 and row.build_s > 0
    assert (row.images, row.first_epoch_s, row.epoch_s, row.data_wait_s,
            row.first_batch_wait_s) == (128, 9.0, [2.0, 1.0, 4.0], [0.5, 0.2, 0.1],
                                        [0.1, 0.05, 0.02])
    assert (row.images_per_s, row.data_wait_share) == (128.0, 0.2)
    assert row.loader_overhead_share == pytest.approx(1 - min(passes) / 1.0)


@pytest.mark.slow
def test_a_failed_row_is_exit_1_after_every_table_and_the_json(tmp_path):
    """ffcv cannot start more numba threads than numba may (NUMBA_NUM_THREADS=1 here): its row
    fails, the other loaders are measured, and the exit status says the run is incomplete."""
    if len(MACHINE_CORES) < 2:
        pytest.skip("2 workers need 2 cores")
    out = tmp_path / "bench.json"
    # on every core, where conftest gave this pytest worker one: --workers 2 needs two
    result = run_script("tools/bench.py", "--quick", "--device", "cpu", "--sections", "loaders",
                        "--workers", "2", "--data-dir", tmp_path / "data", "--json", out,
                        timeout=900, env={**os.environ, "NUMBA_NUM_THREADS": "1"},
                        preexec_fn=lambda: os.sched_setaffinity(0, MACHINE_CORES))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = {r["loader"]: r["status"] for r in json.loads(out.read_text())["loaders"]}
    assert rows == {"ffcv": "failed", "resident": "ok", "torchvision": "ok"}
    assert result.stderr.strip().endswith("error: 1 measurement failed; each one's reason "
                                          "is in its table above.")

"""The profile section of tools/bench.py: torch.profiler over training steps fed by the
engine's own loader, after warm-up steps, so that a run on a GPU leaves a trace to study
offline (the ops taking the most time in the log, the whole timeline as a Chrome trace), and
on a GPU how much of a step the device spends running anything: the rest it waits for the
host (the first H200 run's profile showed 44%: benchmarks/results/h200-2026-12-04/)."""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common.atomic import atomic_write
from common.streams import Log, silent
from engine.config import TrainConfig
from engine.run import endless, train_step
from tools.bench_setup import make_run
from tools.kernel_kinds import kernel_kinds
from tools.timing import sync, timed_steps

TOP = 25  # ops listed in the log and the JSON


@dataclass
class ProfileResult:
    """The ops of profiled training steps, by the time they took on the device (CPU: host)."""

    loader: str
    precision: str
    compile: bool
    batch_size: int
    width: int
    warmup_steps: int  # run first, unprofiled: torch.compile, JIT, worker start-up
    steps: int  # profiled
    sort_by: str  # the column the ops are ranked by
    trace: str  # the gzipped Chrome trace (chrome://tracing, ui.perfetto.dev), or "" if none
    ops: list[dict] = field(default_factory=list)  # the TOP ops: name, calls, self/total ms
    compile_mode: str = "default"
    # per step, on CUDA: how long the device ran any kernel, copy or fill (from the profile);
    # the same number of steps timed again without the profiler, whose host work would slow
    # them; and the first over the second
    device_busy_ms: float | None = None
    step_ms: float | None = None
    device_busy_share: float | None = None
    # on CUDA: the kernels' time per step by kind, read from their names (tools/kernel_kinds.py),
    # the most first
    kernel_kinds: list[dict] | None = None


def write_trace(prof: profile, path: Path) -> None:
    """The profiler's Chrome trace, gzipped, written atomically; beside --json, in the folders
    --json may name still to make (written before --json is, the trace failed without them,
    and the command with it, its measurement lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))

        def compress(target: Path) -> None:
            with open(raw, "rb") as source, gzip.open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)

        atomic_write(path, compress)


def top_ops(prof: profile, device: bool) -> tuple[str, list[dict]]:
    """(ranking column, the TOP ops by self time on the device, or on the host on CPU).

    Ops only: each kernel is also an event of its own, which would list a kernel that an op
    launched alone (every Triton kernel, by the same name) twice."""
    where = "device" if device else "cpu"
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    ranked = sorted(ops, reverse=True, key=lambda e: getattr(e, f"self_{where}_time_total"))
    return f"self_{where}_ms", [
        dict(name=e.key, calls=e.count,
             **{f"self_{where}_ms": getattr(e, f"self_{where}_time_total") / 1e3,
                f"{where}_ms": getattr(e, f"{where}_time_total") / 1e3})
        for e in ranked[:TOP]]


def covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans: how long at least one of them ran,
    however many overlapped (kernels on several streams, a copy beside a kernel)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:  # the part of this span past everything before it
            total += stop - max(start, end)
            end = stop
    return total


def activities(cuda: bool) -> list[ProfilerActivity]:
    """What torch.profiler records: host ops, and on CUDA the device's kernels too."""
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def device_events(prof: profile) -> list:
    """The profile's device-side events: kernels, copies and fills. Not the spans kineto draws
    on the device for each record_function scope (inductor's '## Call CompiledFxGraph', the
    optimizer's step): from their first kernel to their last, gaps included, they would count
    the launch gaps as busy (torch's own tables leave them out too; torch 2.4 cannot tell)."""
    return [e for e in prof.events() if e.device_type != DeviceType.CPU
            and not getattr(e, "is_user_annotation", False)]


def device_busy_us(events: list) -> float:
    """Microseconds in which the device ran any of these device-side events."""
    return covered([(e.time_range.start, e.time_range.end) for e in events])


# why a CUDA profile's busy time is missing: a GPU step launches kernels, so a profile without
# one is CUPTI not attached, and a 0% busy device would read as a measurement
NO_DEVICE_EVENTS = ("the profiler recorded no device event, so the device's busy time is left "
                    "out: CUPTI did not attach (KINETO_LOG_LEVEL=6, which bench.py sets, hides "
                    "its error; rerun with KINETO_LOG_LEVEL=2 to see it)")


def device_busy_ms(events: list) -> float | None:
    """Milliseconds in which the device ran these device events (device_events'); None where
    there are none (NO_DEVICE_EVENTS)."""
    return device_busy_us(events) / 1e3 if events else None


def bench_profile(cfg: TrainConfig, args: argparse.Namespace, trace: Path | None,
                  log: Log = silent) -> ProfileResult:
    """Profile args.profile_steps training steps after args.warmup_steps, batches from cfg's
    loader; the Chrome trace goes to `trace` when given."""
    run = make_run(cfg, args.threads)
    cuda = run.accelerator.device.type == "cuda"
    with closing(endless(run)) as batches:
        for _ in range(args.warmup_steps):
            train_step(run, *next(batches))
        sync(run.accelerator.device)
        with profile(activities=activities(cuda)) as prof:  # its time holds the profiler's own
            timed_steps(run, batches, args.profile_steps)
        steps_s = timed_steps(run, batches, args.profile_steps) if cuda else None
    if trace is not None:
        write_trace(prof, trace)
    sort_by, ops = top_ops(prof, cuda)
    result = ProfileResult(cfg.loader, cfg.precision, cfg.compile, run.train_loader.batch_size,
                           cfg.width, args.warmup_steps, args.profile_steps, sort_by,
                           str(trace or ""), ops, cfg.compile_mode)
    if steps_s is not None:
        result.step_ms = steps_s * 1e3 / args.profile_steps
        events = device_events(prof)
        busy_ms = device_busy_ms(events)
        if busy_ms is None:
            log(f"profile: {NO_DEVICE_EVENTS}")
        else:
            result.device_busy_ms = busy_ms / args.profile_steps
            result.device_busy_share = result.device_busy_ms / result.step_ms
            result.kernel_kinds = kernel_kinds(((e.name, e.time_range.elapsed_us())
                                                for e in events), args.profile_steps)
    log(f"profile: {len(ops)} ops by {sort_by}, the first {ops[0]['name'] if ops else '-'}"
        + (f"; trace {trace}" if trace else ""))
    return result

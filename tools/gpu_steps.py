"""The GPU suite's steps as data: what each one runs, and how long it may take.

Steps, in the order `all` runs them (most wanted first, so a short lease measures what matters):
tests-quick (pytest -m "gpu and not slow"), train (the seed pipeline, then the fast preset
compiled, on 50k synthetic images: the headline ratio), bench-peers (the public loaders and the
seed pipeline's epoch beside ours), bench-epoch (loaders, 50k-image epochs per loader, MFU, a
profile), tests-e2e (pytest -m "gpu and slow" on several workers, then the gpu_alone ones one
at a time), train-eager (the fast preset not compiled), profile-ffcv (bench-epoch's profile,
its steps fed by the ffcv loader), bench-step (the precision x format x compile x batch grid).
In a dry run the same commands run on the CPU with tiny sizes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.hardware import available_cores
from engine.config import PRESETS, TrainConfig
from tools import ROOT
from tools.gpu_environment import missing

STEPS = ("tests-quick", "train", "bench-peers", "bench-epoch", "tests-e2e", "train-eager",
         "profile-ffcv", "bench-step")
GROUPS = {"all": STEPS, "tests": ("tests-quick", "tests-e2e"),
          "bench": ("bench-peers", "bench-epoch", "profile-ffcv", "bench-step")}
STEP_LIMIT_S = 530  # every step ends (its command killed) before 9 minutes
# the first steps' own limits, in whole minutes at 1.6x or more of their times on the first H200
# run (52, 106, 97 and 111 s: benchmarks/results/h200-2026-12-04/): a hang in the quick tests,
# or a step slower on another GPU, leaves the next steps of a 9-minute lease their turn.
# bench-epoch's is three minutes more: its five epochs now compile, four on CUDA graphs (our
# estimate from the first run's sections: 150 to 220 s), and the untuned one starts a process
# of its own (tools/bench_sections.bench_epoch_alone: imports, CUDA, a compile from warm caches);
# profile-ffcv's, not run yet, is an estimate (a process, FFCV's numba JIT, a compile, 43 steps)
LIMITS = {"tests-quick": 120, "train": 180, "bench-peers": 180, "bench-epoch": 360,
          "profile-ffcv": 120}
TEST_WORKERS, TEST_CORES = 4, 4  # tests-e2e on 16 cores: 4 workers of 4 cores each
DRY_TEST_WORKERS = 2  # a dry run's (skipped) tests-e2e spread as a GPU's do, on any cores
# the fast preset's (1 in a dry run); GPU_SUITE_EPOCHS=N sets N instead
EPOCHS = TrainConfig(**PRESETS["fast"]).epochs


def suite_device(dry: bool) -> str:
    """The device a suite's commands run on: the CPU in a dry run, else the GPU."""
    return "cpu" if dry else "cuda"


@dataclass
class Suite:
    """Where a suite writes, how its commands run, its deadline, and whether it is a dry run."""

    results: Path
    work: Path  # data and run folders: large, so kept out of the results
    python: str
    env: dict
    dry: bool
    meta: dict  # the header of every log
    steps: list[str]  # what this run was asked for, in order
    deadline: float = math.inf  # time.monotonic() at which --budget runs out
    bundle: Path | None = None
    done: list[dict] = field(default_factory=list)  # one record per step run so far

    @property
    def device(self) -> str:
        return suite_device(self.dry)

    def script(self, path: str, *args: str) -> list[str]:
        """The argv of a repository script run with the suite's Python, from any directory."""
        return [self.python, str(ROOT / path), *args]


# a step's commands, in order: (name, argv) each
Commands = list[tuple[str, list[str]]]
# the modules holding tests marked gpu (named, not searched for: a bare GPU machine lacks the
# packages other test modules import, such as onnxruntime)
GPU_TESTS = ("test_gpu.py", "test_predict.py")


def pytest_step(s: Suite, name: str, marks: str, workers: int = 1) -> Commands:
    """pytest on the tests of `marks` in GPU_TESTS (skipped, not run, in a dry run on the
    CPU); verbose, with each failure's traceback printed when it fails, so a command killed at
    its limit still shows which tests passed and why the others failed. On one worker each
    test's seconds are on its line; on several (pytest-xdist) that style prints no true times,
    so they come from --durations and the junit report."""
    spread = ["-n", str(workers)] if workers > 1 else ["-o", "console_output_style=times"]
    return [(name, [s.python, "-m", "pytest", "-v", "-m", marks, "-p", "no:cacheprovider",
                    "-p", "tests.failures_at_once", *spread, "--durations", "0",
                    "--junitxml", str(s.results / f"{name}.xml"),
                    *(str(ROOT / "tests" / f) for f in GPU_TESTS)])]


def end_to_end_tests(s: Suite) -> Commands:
    """The slow GPU tests, runs of the commands end to end: spread over test_workers (in a
    row, the first H200 run's budget cut them at the 9th of 10, after 233 s), then those
    marked gpu_alone one at a time, as they fill the GPU's memory or time it."""
    workers = test_workers(s.python, s.env, s.dry)
    return [*pytest_step(s, "tests-e2e", "gpu and slow and not gpu_alone", workers),
            *pytest_step(s, "tests-e2e-alone", "gpu and slow and gpu_alone")]


def test_workers(python: str, env: dict, dry: bool) -> int:
    """pytest-xdist workers for the end-to-end tests: one per TEST_CORES cores, at most
    TEST_WORKERS (each runs subprocesses with loader threads of their own), DRY_TEST_WORKERS
    in a dry run (its tests skip: the spread is what it rehearses), or 1 where `python` lacks
    pytest-xdist."""
    if missing(python, env, ("xdist",)):
        return 1
    if dry:
        return DRY_TEST_WORKERS
    return max(1, min(TEST_WORKERS, available_cores() // TEST_CORES))


def bench(s: Suite, name: str, sections: str, *options: str) -> Commands:
    """One tools/bench.py run of `sections` with its JSON in the results: its defaults for
    CUDA but `options`, or --quick in a dry run."""
    return [(name, s.script("tools/bench.py", "--device", s.device, "--sections", sections,
                            "--data-dir", str(s.work / "data"),
                            "--json", str(s.results / f"{name}.json"), *options,
                            *(["--quick"] if s.dry else [])))]


def train_commands(s: Suite, *names: str) -> Commands:
    """engine/train.py runs by name: the fast preset compiled or eager, or the seed notebook's
    pipeline; on 50k synthetic images (tiny ones in a dry run)."""
    epochs = os.environ.get("GPU_SUITE_EPOCHS", "1" if s.dry else str(EPOCHS))
    data = ["--dataset", "synthetic", "--data-dir", str(s.work / "data")]
    if s.dry:
        data += ["--synthetic-size", "256", "64", "--width", "8"]
    compile = [] if s.dry else ["--compile"]  # CUDA's default, said explicitly
    runs = {"train-fast-compile": ["--epochs", epochs, *compile],
            "train-seed": ["--preset", "seed", "--loader", "torchvision", "--precision",
                           "fp32", "--no-compile", "--no-channels-last", "--epochs", "2"],
            "train-fast-eager": ["--epochs", epochs, "--no-compile"]}
    return [(name, s.script("engine/train.py", *data, *runs[name], "--out", str(s.work / name)))
            for name in names]


COMMANDS = {
    "tests-quick": lambda s: pytest_step(s, "tests-quick", "gpu and not slow"),
    # loaders over 50k images, a 50k-image epoch per loader with its data-wait share, the MFU
    # of each, and a profile (with its trace) of the default run's steps
    "bench-epoch": lambda s: bench(s, "bench-epoch", "loaders,epoch,mfu,profile"),
    # the headline: the seed pipeline, then the default preset compiled, on the same GPU; the
    # short, fixed seed run first, so a compiled run cut by the step's limit leaves it measured
    "train": lambda s: train_commands(s, "train-seed", "train-fast-compile"),
    "tests-e2e": end_to_end_tests,
    # airbench's loader, stock FFCV and the seed DataLoader beside ours over 50k images (and a
    # profiled epoch of each: the device's busy time), then a 50k-image training epoch of the
    # seed pipeline beside the default preset, with the MFU
    "bench-peers": lambda s: bench(s, "bench-peers", "peers,mfu"),
    "train-eager": lambda s: train_commands(s, "train-fast-eager"),
    # the profile of bench-epoch, its steps fed by the ffcv loader: the first H200 run's ffcv
    # epoch waited for data 13.3% of its time (goal: under 2%), with FFCV's ToDevice then; the
    # loader now copies on a stream of its own (loaders/stream.py): is the wait gone?
    "profile-ffcv": lambda s: bench(s, "profile-ffcv", "profile", "--profile-loader", "ffcv"),
    # every precision x format x compile at batch 512, then batch 256 and 1024 (compiled), all on
    # CUDA graphs (the engine's mode), then torch.compile's default mode: 9 of its 15
    # configurations compile; the JSON is rewritten after each one
    "bench-step": lambda s: bench(s, "bench-step", "step,mfu"),
}

"""tools/gpu_suite.sh on the CPU: the dry run executes every step's real commands with tiny
sizes, and a Python that lacks ffcv gets the .whl/ wheels installed or a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PY312 = Path("/root/.pyenv/versions/3.12.1/bin/python3")


def suite(*args, python: str = sys.executable, timeout: float = 900
          ) -> subprocess.CompletedProcess:
    """`bash tools/gpu_suite.sh args` with PYTHON set, as `make gpu` runs it."""
    env = {**os.environ, "PYTHON": python}
    env.pop("OUT", None)  # the results go where --results says
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("gpu-results")
    result = suite("all", "--dry-run", "--results", results)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return results


@pytest.mark.slow
def test_dry_run_writes_every_step_with_its_header(dry_run):
    for step in ("tests", "bench-step", "bench-epoch", "bench-peers", "train"):
        head = dict(line[2:].split(": ", 1) for line in
                    (dry_run / f"{step}.log").read_text().splitlines() if line.startswith("# ")
                    and ": " in line)
        assert head["step"] == step and head["device"] == "cpu" and head["dry_run"] == "True"
        assert head["command"].startswith("bash tools/gpu_suite.sh all --dry-run")
        for key in ("commit", "torch", "ffcv", "accelerate", "numba", "grad-cam", "python"):
            assert head[key], key
        summary = json.loads((dry_run / f"{step}.summary.json").read_text())
        assert summary["ok"] and all(c["returncode"] == 0 for c in summary["commands"])
        assert summary["meta"]["step"] == step


@pytest.mark.slow
def test_dry_run_bench_and_tests_leave_their_results(dry_run):
    assert "testsuite" in (dry_run / "tests.xml").read_text()  # pytest's junit report
    step = json.loads((dry_run / "bench-step.json").read_text())
    assert step["meta"]["device"] == "cpu" and step["step"] and "loaders" not in step
    epoch = json.loads((dry_run / "bench-epoch.json").read_text())
    assert {r["loader"] for r in epoch["loaders"]} == {"ffcv", "resident", "torchvision"}
    assert epoch["step"][0]["precision"] == "fp32" and epoch["mfu"]["rows"]
    assert epoch["profile"]["ops"] and (dry_run / "bench-epoch.trace.json.gz").stat().st_size
    peers = json.loads((dry_run / "bench-peers.json").read_text())["peers"]
    assert {r["loader"] for r in peers["loaders"]} >= {"airbench.CifarLoader", "stock ffcv.Loader"}
    assert [e["pipeline"] for e in peers["epochs"]] == ["seed", "default"]


@pytest.mark.slow
def test_dry_run_trains_the_fast_and_seed_pipelines(dry_run):
    for name, epochs in (("train-fast-compile", 1), ("train-fast-eager", 1), ("train-seed", 2)):
        rows = (dry_run / name / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == epochs, name
        assert not (dry_run / name / "ckpt.pt").exists()  # checkpoints stay out of the results
    seed = json.loads((dry_run / "train-seed" / "config.json").read_text())
    assert (seed["preset"], seed["loader"], seed["precision"], seed["compile"],
            seed["channels_last"]) == ("seed", "torchvision", "fp32", False, False)
    eager = json.loads((dry_run / "train-fast-eager" / "config.json").read_text())
    assert eager["preset"] == "fast" and eager["compile"] is False


def test_without_dry_run_a_machine_without_gpu_is_told_so(tmp_path):
    result = suite("tests", "--results", tmp_path / "r", timeout=120)
    assert result.returncode == 1
    assert "no CUDA GPU" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.slow
@pytest.mark.skipif(not PY312.exists() or not list((ROOT / ".whl").glob("ffcv-*.whl")),
                    reason="needs pyenv's Python 3.12 and wheels built by `make wheels`")
def test_a_python_without_ffcv_gets_the_wheels_installed(tmp_path):
    """pyenv's bare 3.12 (no numpy, no torch here): the wheels land in --site, then the
    missing numpy is named; on the GPU image the same path goes on to run the step."""
    site = tmp_path / "site"
    result = suite("tests", "--dry-run", "--results", tmp_path / "r", "--site", site,
                   python=str(PY312), timeout=300)
    assert "installing" in result.stdout and result.returncode == 1
    assert (site / "ffcv" / "__init__.py").exists()
    assert (site / "pytorch_grad_cam" / "__init__.py").exists()
    assert "still cannot import ffcv" in result.stderr and "numpy" in result.stderr
    assert "Traceback" not in result.stderr

"""The LR range test: engine.lr_range on a real run, tools/lr_find.py and engine/train.py --lr
auto as real subprocesses, on synthetic data on the CPU."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script

from engine import lr_range
from engine.config import TrainConfig, resolve
from engine.optimizers import lr_at
from engine.run import Run, build, make_accelerator, train_step
from loaders.prepare import prepare
from tools import lr_find

SIZE = (1000, 200)
BATCH = 32  # 32 steps per epoch: the sweeps below run over several epochs
SMALL = ["--dataset", "synthetic", "--synthetic-size", *map(str, SIZE), "--width", "16",
         "--batch-size", str(BATCH), "--loader", "resident"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic data, converted once for every run of this module."""
    path = tmp_path_factory.mktemp("data")
    prepare("synthetic", path, SIZE, workers=1)
    return path


def small_run(data_dir: Path, out: Path) -> Run:
    cfg = TrainConfig(dataset="synthetic", data_dir=str(data_dir), synthetic_size=SIZE,
                      width=16, batch_size=BATCH, loader="resident", precision="fp32",
                      compile=False, out=str(out))
    cfg = resolve(cfg, cuda=False)
    return build(cfg, make_accelerator(cfg))


def assert_identical(a, b, where: str = "state") -> None:
    """Nested dicts, lists and tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_range_test_sweeps_suggests_inside_and_restores_the_run_bit_exact(data_dir, tmp_path):
    run = small_run(data_dir, tmp_path / "out")
    for images, labels in itertools.islice(run.train_loader, 3):  # momentum, BN stats, schedule
        train_step(run, images, labels)
    scheduler = run.scheduler
    before = copy.deepcopy(dict(model=run.model.state_dict(),
                                optimizer=run.optimizer.state_dict(),
                                scheduler=scheduler.state_dict()))

    result = lr_range.range_test(run, start_lr=1e-4, end_lr=10.0, iterations=40)

    lrs = np.array(result.lrs)
    assert 2 <= len(lrs) == len(result.losses) == len(result.smoothed) <= 40
    assert lrs[0] == pytest.approx(1e-4)
    assert np.allclose(np.diff(np.log(lrs)), math.log(1e5) / 39)  # exponential, 40 steps to 10
    assert result.smoothed[0] == pytest.approx(result.losses[0])  # bias-corrected average
    assert all(math.isfinite(x) for x in result.losses)
    for lr in (result.steepest, result.min_over_10):
        assert lrs[0] <= lr <= lrs[-1]
    assert result.suggested == result.min_over_10
    assert result.record() == dict(suggested=result.suggested, steepest=result.steepest,
                                   min_over_10=result.min_over_10)

    assert run.scheduler is scheduler
    assert_identical(run.model.state_dict(), before["model"], "model")
    assert_identical(run.optimizer.state_dict(), before["optimizer"], "optimizer")
    assert_identical(scheduler.state_dict(), before["scheduler"], "scheduler")
    assert run.train_loader.epoch == 0 and run.model.training


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-5, 1, 61).tolist()  # 0.1 decade apart
    x = np.log10(lrs)
    # steepest fall at 1e-3, minimum at 1e-1, rising after it
    loss = -np.tanh(2 * (x + 3)) + 3 * np.clip(x + 1, 0, None) ** 2
    steepest, min_over_10 = lr_range.suggestions(lrs, loss.tolist())
    assert steepest == pytest.approx(1e-3)
    assert min_over_10 == pytest.approx(1e-2)
    assert lr_range.suggestions(lrs, np.linspace(1, 2, 61).tolist()) == (lrs[0], lrs[0])


@pytest.mark.parametrize("start, end, iterations", [(1.0, 0.1, 100), (0.0, 1.0, 100),
                                                    (1e-5, 1.0, 1)])
def test_impossible_sweeps_are_refused(start, end, iterations):
    with pytest.raises(ValueError, match="start-lr|iterations"):
        lr_range.check_sweep(start, end, iterations)


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_prints_the_suggestion(data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_script("tools/lr_find.py", *SMALL, "--data-dir", str(data_dir), "--start-lr",
                     "1e-4", "--iterations", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["lr", "loss", "smoothed"] and 2 <= len(rows) <= 20
    suggested = float(re.search(r"suggested lr (\S+)", result.stdout).group(1))
    assert float(rows[0]["lr"]) <= suggested <= float(rows[-1]["lr"])


@pytest.mark.parametrize("args, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "start-lr"),
    (["--end-lr", "inf"], "both finite"),
    (["--iterations", "1"], "iterations"),
    (["--resume", "somewhere"], "resume"),
    (["--optimizer", "lion"], "invalid choice"),
])
def test_lr_find_refuses_bad_options_with_a_usage_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        lr_find.main([*args, "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_lr_auto_trains_at_the_suggestion(data_dir, tmp_path):
    out = tmp_path / "out"
    batch = 16  # the sweep is 100 steps long: small steps keep it short
    result = run_script("engine/train.py", *SMALL, "--batch-size", str(batch), "--data-dir",
                     str(data_dir), "--lr", "auto", "--schedule", "onecycle", "--epochs", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LR range test" in result.stdout
    config = json.loads((out / "config.json").read_text())
    peak = config["lr"]
    assert isinstance(peak, float) and peak == config["lr_auto"]["suggested"]
    assert config["lr_auto"]["min_over_10"] == peak and config["schedule"] == "onecycle"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["lr"] == peak
    assert ckpt["resume"]["scheduler"]["base_lrs"] == [peak, peak]  # both parameter groups
    steps = math.ceil(SIZE[0] / batch)
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["lr"] == pytest.approx(peak * lr_at("onecycle", steps, steps, config["warmup"]))

"""The LR range test: engine.lr_range on a real run, tools/lr_find.py and engine/train.py --lr
auto as real subprocesses, on synthetic data on the CPU."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, tmpfs

from common.errors import RangeTestError
from engine import lr_range, lr_sweep
from engine.config import TrainConfig, resolve
from engine.history import read_history
from engine.launch import make_accelerator
from engine.optimizers import lr_at
from engine.run import Run, build, endless, train_step
from loaders.preparation import prepare
from tools import lr_curve, lr_find

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
def test_range_test_sweeps_suggests_inside_and_restores_the_run_bit_exact(data_dir, tmp_path,
                                                                         monkeypatch):
    """The run is handed over in eval mode (say, just evaluated): the sweep trains as training
    does, BatchNorm on each batch's statistics, and gives the run back in eval mode."""
    run = small_run(data_dir, tmp_path / "out")
    for images, labels in itertools.islice(run.train_loader, 3):  # momentum, BN stats, schedule
        train_step(run, images, labels)
    run.model.eval()
    scheduler = run.scheduler
    before = copy.deepcopy(dict(model=run.model.state_dict(),
                                optimizer=run.optimizer.state_dict(),
                                scheduler=scheduler.state_dict()))
    modes, step = [], lr_range.train_step

    def noting_the_mode(run: Run, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        modes.append(run.model.training)
        return step(run, *batch)

    monkeypatch.setattr(lr_range, "train_step", noting_the_mode)
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
    assert len(modes) == len(result.losses) and all(modes)  # every step, in train mode
    assert run.train_loader.epoch == 0 and not run.model.training


def test_the_sweep_stops_past_four_times_its_lowest_smoothed_loss_not_its_first():
    assert not lr_range.diverging([1.0, 3.9]) and lr_range.diverging([1.0, 4.1])
    assert lr_range.diverging([2.0, 0.5, 2.1])  # far below 4 x the first, 2.0


def test_the_sweeps_losses_are_each_batchs_mean_loss(data_dir, tmp_path):
    """The curve, lr_find.csv and the divergence rule read a step's loss per image: the sum
    over the batch was 32 times it. A twin run takes the same first batch to check it."""
    swept, twin = (small_run(data_dir, tmp_path / name) for name in ("swept", "twin"))
    result = lr_range.range_test(swept, start_lr=1e-4, end_lr=1e-3, iterations=20)
    images, labels = next(endless(twin))
    loss_sum, _ = train_step(twin, images, labels)  # its loss is before its update
    assert result.losses[0] == pytest.approx(loss_sum.item() / len(labels), rel=1e-5)


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-5, 1, 61).tolist()  # 0.1 decade apart
    x = np.log10(lrs)
    # steepest fall at 1e-3, minimum at 1e-1, rising after it
    loss = -np.tanh(2 * (x + 3)) + 3 * np.clip(x + 1, 0, None) ** 2
    steepest, min_over_10 = lr_range.suggestions(lrs, loss.tolist())
    assert steepest == pytest.approx(1e-3)
    assert min_over_10 == pytest.approx(1e-2)
    assert lr_range.suggestions(lrs, np.linspace(1, 2, 61).tolist()) == (lrs[0], lrs[0])


def test_suggestions_skip_the_early_points_of_the_slope_search():
    """The steepest fall among the first SKIP (10) points is the average still settling on a
    few batches: it is never suggested. Points 0.1 decade apart; slopes by central
    differences, in units of 1 / (0.1 ln 10)."""
    lrs = np.logspace(-5, -3.3, 18).tolist()
    smoothed = [5.0, 4.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 1.8, 1.5, 1.45, 1.4,
                1.5, 1.7]  # minimum at point 15
    # slopes from point 10 to 15: -0.1, -0.2, -0.3, -0.175, -0.05, +0.025; points 0 and 1: -1
    steepest, min_over_10 = lr_range.suggestions(lrs, smoothed)
    assert steepest == lrs[12]
    assert min_over_10 == pytest.approx(lrs[15] / 10)


def test_a_steep_fall_anywhere_in_the_first_skip_points_is_not_the_steepest():
    """Not only the first point or two: a drop at points 6 and 7, still among the first SKIP
    (10), steeper than any after them, is the average settling too; the steepest is searched
    from point 10 on (slopes there: -0.1, -0.175, -0.15, -0.075, -0.1, +0.05)."""
    lrs = np.logspace(-5, -3.3, 18).tolist()
    smoothed = [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 4.4, 3.0, 2.9, 2.8, 2.7, 2.6, 2.35, 2.3, 2.2, 2.1,
                2.3, 2.5]  # minimum at point 15; slopes at points 6 and 7: -0.75
    assert lr_sweep.SKIP == 10
    assert lr_range.suggestions(lrs, smoothed)[0] == lrs[11]


def test_a_fall_after_the_minimum_is_not_the_steepest():
    """A loss that blew up past its minimum (point 12) and fell back, still above it: that
    fall (slope -3 at point 15) is at LRs that diverge; the steepest is searched on the
    descent only (slopes at points 10 to 12: -0.175, -0.15, +1.5)."""
    lrs = np.logspace(-5, -3.3, 18).tolist()
    smoothed = [5.0, 4.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 1.95, 1.9, 5.0, 9.0, 6.0,
                3.0, 2.5]
    assert lr_range.suggestions(lrs, smoothed) == (lrs[10], pytest.approx(lrs[12] / 10))


def test_a_curve_falling_fastest_at_its_last_point_suggests_that_point_as_steepest():
    """A sweep that ended before its loss turned: the minimum is its last point, and so is the
    steepest fall (np.gradient's one-sided slope there); the search includes the minimum."""
    lrs = np.logspace(-5, -3.6, 15).tolist()
    smoothed = [5.0 - 0.02 * i**2 for i in range(15)]  # falls ever faster to point 14
    steepest, min_over_10 = lr_range.suggestions(lrs, smoothed)
    assert steepest == lrs[14]
    assert min_over_10 == pytest.approx(lrs[14] / 10)


def test_suggestions_never_go_below_the_start_of_the_sweep():
    """A minimum within the sweep's first decade: a tenth of its LR lies below start_lr, so
    start_lr it is; the slope search then starts one point before the minimum."""
    lrs = np.logspace(-5, -4.5, 6).tolist()
    smoothed = [3.0, 2.5, 1.0, 2.0, 3.0, 4.0]  # minimum at point 2: slopes searched from 1
    assert lr_range.suggestions(lrs, smoothed) == (lrs[1], lrs[0])


@pytest.mark.parametrize("smoothed, caveat", [
    ([3.0, 2.0, 1.0, 2.0, 3.0], None),  # a minimum inside the sweep
    ([3.0, 2.5, 2.0, 1.5, 1.0], "but the loss still fell at the sweep's last lr 0.0001, so its "
                                "minimum, and with it the suggestion, lie higher: sweep to "
                                "higher LRs (tools/lr_find.py --end-lr)"),
    ([1.0, 1.5, 1.2, 1.8, 2.0], "but the loss never fell below its first step's, so the "
                                "suggestion is the sweep's start: widen the sweep "
                                "(tools/lr_find.py --start-lr, --end-lr)"),
    # a flat curve's noise: a walkthrough's 1e-7..1e-5 sweep wandered between 2.572 and 2.622
    ([2.6, 2.62, 2.5, 2.61, 2.59], "but the loss hardly moved (its lowest 3.8% below its first "
                                   "step's), so the minimum the suggestion rests on is noise: "
                                   "widen the sweep (tools/lr_find.py --start-lr, --end-lr)"),
    ([2.6, 2.62, 2.46, 2.61, 2.59], None),  # 5.4% below: a minimum
])
def test_a_sweep_that_never_saw_the_loss_stop_falling_says_so(smoothed, caveat):
    """A sweep wholly below the LRs that train fast (or one whose loss never fell, or hardly)
    suggested its edge, or a flat curve's noise, as confidently as a real minimum's tenth.
    Each caveat is asserted whole: its advice (which option to change) is what the user acts on."""
    lrs = np.logspace(-5, -4, 5).tolist()
    result = lr_range.RangeTest(lrs, smoothed, smoothed, *lr_range.suggestions(lrs, smoothed),
                                diverged=False)
    said = lr_range.found(result)
    if caveat is None:
        assert result.caveat is None and said.endswith(")")
    else:
        assert result.caveat == caveat and said.endswith(f"), {result.caveat}")
    # one that diverged found the rise: its minimum is real even at the edge
    assert replace(result, diverged=True).caveat is None


def test_how_far_the_loss_fell_is_read_from_the_smoothed_curve_not_one_noisy_batch() -> None:
    """The minimum the suggestion rests on is the smoothed loss's, so how far the loss fell is
    measured on it too: one batch whose own loss dipped 20% (a lucky batch) under a smoothed
    curve that moved 3.8% is still a flat curve's noise."""
    lrs = np.logspace(-5, -4, 5).tolist()
    smoothed = [2.6, 2.62, 2.5, 2.61, 2.59]
    losses = [2.6, 2.64, 2.08, 2.7, 2.57]
    result = lr_range.RangeTest(lrs, losses, smoothed, *lr_range.suggestions(lrs, smoothed),
                                diverged=False)
    assert result.caveat is not None
    assert result.caveat.startswith("but the loss hardly moved (its lowest 3.8% below its first "
                                    "step's)")


def test_a_sweep_whose_loss_never_moves_suggests_its_start_and_says_why(data_dir, tmp_path):
    """A classifier of zeros gives every image the same loss, log 10, and at LRs of 1e-20 its
    updates stay far below float32's resolution of the logits: the loss neither falls nor
    diverges. The sweep suggests its start with the caveat, not the error of a sweep that
    diverged before its loss fell; and not silently, as when an average of the losses
    themselves dipped below a flat curve in rounding, a minimum at its second step."""
    run = small_run(data_dir, tmp_path / "out")
    with torch.no_grad():
        run.model.fc.weight.zero_()
        run.model.fc.bias.zero_()
    result = lr_range.range_test(run, start_lr=1e-20, end_lr=1e-19, iterations=20)
    assert len(result.losses) == 20 and len(set(result.losses)) == 1  # flat, as meant
    assert not result.diverged and result.smoothed == result.losses
    assert result.suggested == result.steepest == result.lrs[0]
    assert result.caveat.startswith("but the loss never fell below its first step's")


@pytest.mark.slow
def test_a_sweep_stops_where_it_diverges_and_leaves_eval_mode_as_it_was(data_dir, tmp_path):
    """From lr 0.01 to 1000 the loss blows up within 20 steps: the sweep stops at the first
    step whose smoothed loss exceeds 4 x the lowest so far (not later, at NaN or the end).
    A run in eval mode is put back in eval mode."""
    cfg = resolve(TrainConfig(dataset="synthetic", data_dir=str(data_dir), synthetic_size=SIZE,
                              width=8, batch_size=16, loader="resident", precision="fp32",
                              compile=False, out=str(tmp_path / "out")), cuda=False)
    run = build(cfg, make_accelerator(cfg))
    run.model.eval()
    result = lr_range.range_test(run, start_lr=0.01, end_lr=1000.0, iterations=20)
    assert not run.model.training

    smoothed = result.smoothed
    assert result.diverged and len(smoothed) < 20
    assert smoothed[-1] > 4 * min(smoothed)
    assert all(s <= 4 * min(smoothed[:i + 1]) for i, s in enumerate(smoothed[:-1]))
    # the bias-corrected moving average with beta 0.98, by hand for every point (each loss
    # weighed in, not only its difference from the one before)
    average = 0.0
    for i, loss in enumerate(result.losses):
        average = 0.98 * average + 0.02 * loss
        assert smoothed[i] == pytest.approx(average / (1 - 0.98 ** (i + 1)), rel=1e-9), i

    # from lr 1e30 the first step's update makes the second loss infinite: one point is no
    # curve
    with pytest.raises(RangeTestError, match="not finite within the first steps"):
        lr_range.range_test(run, start_lr=1e30, end_lr=1e31, iterations=20)
    assert not run.model.training


def _says_there_is_nothing_to_suggest(code: int, stdout: str, stderr: str, out: Path,
                                      fix: str) -> None:
    """A sweep that diverged before its loss fell: exit 1, one error line saying why there is
    no suggestion and what to change, no LR to train with, and no --out folder."""
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.startswith("error: the LR range test diverged at lr "), stderr
    assert "before its loss ever fell below the first step's" in stderr
    assert stderr.endswith(f"none to suggest; {fix}.\n"), stderr
    assert "Train with" not in stdout and not out.exists()


@pytest.mark.slow
def test_a_sweep_that_diverges_before_its_loss_falls_suggests_nothing(data_dir, tmp_path):
    """It suggested its first LR, where it had just diverged ('suggested lr 100 ... Train with
    --lr 100'), and exited 0; now the error says why there is no suggestion, and writes
    nothing. A real process: what a user sees, exit code and all."""
    out = tmp_path / "out"
    result = run_script("tools/lr_find.py", *SMALL, "--data-dir", str(data_dir),
                        "--iterations", "20", "--start-lr", "100", "--end-lr", "1e5",
                        "--out", str(out))
    _says_there_is_nothing_to_suggest(result.returncode, result.stdout, result.stderr, out,
                                      "start the sweep lower than lr 1e+02, or sweep in finer "
                                      "steps (more --iterations, or a narrower range)")


@pytest.mark.slow
@pytest.mark.parametrize("args, fix", [
    (["--weight-decay", "1e30"], "use a --weight-decay far below 1 (the sweep ran with 1e+30)"),
    # a decay of 1 alone takes lr x 1 of the weights each step: the decay is still to blame
    (["--start-lr", "100", "--end-lr", "1e5", "--weight-decay", "1"],
     "use a --weight-decay far below 1 (the sweep ran with 1)"),
])
def test_a_sweep_that_a_weight_decay_made_diverge_names_the_decay(data_dir, tmp_path, capsys,
                                                                 args, fix):
    """A decay of 1 or more diverges the sweep whatever its LR: the fix named is the decay,
    not a lower start. In-process through the command's main (the real process is run
    above), which a subprocess would only make seconds slower."""
    out = tmp_path / "out"
    code = lr_find.main([*SMALL, "--data-dir", str(data_dir), "--iterations", "20", *args,
                         "--out", str(out)])
    said = capsys.readouterr()
    _says_there_is_nothing_to_suggest(code, said.out, said.err, out, fix)


@pytest.mark.parametrize("start, end, iterations, said", [
    (1.0, 0.1, 100, "needs 0 < --start-lr < --end-lr"),
    (0.0, 1.0, 100, "needs 0 < --start-lr < --end-lr"),
    (1e-5, 1.0, 1, "--iterations must be at least 20"),
    (1e-5, 1.0, 19, "--iterations must be at least 20")])
def test_impossible_sweeps_are_refused(start, end, iterations, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        lr_sweep.check_sweep(start, end, iterations)


def test_the_shortest_and_the_longest_sweeps_allowed_run():
    """The limits the messages give ('at least 20', 'at most 100,000') are allowed themselves."""
    lr_sweep.check_sweep(1e-5, 1.0, lr_sweep.MIN_ITERATIONS)
    lr_sweep.check_sweep(1e-5, 1.0, lr_sweep.MAX_ITERATIONS)
    with pytest.raises(ValueError, match="at most 100,000"):
        lr_sweep.check_sweep(1e-5, 1.0, lr_sweep.MAX_ITERATIONS + 1)


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_prints_the_suggestion(data_dir, tmp_path):
    """lr_find.csv holds the sweep's steps (the LR from --start-lr up by equal factors to
    --end-lr), and the LR printed, in the summary and in the command to train with, is a tenth
    of the LR of the csv's lowest smoothed loss (not below the start): not the steepest's."""
    out = tmp_path / "out"
    result = run_script("tools/lr_find.py", *SMALL, "--data-dir", str(data_dir), "--start-lr",
                        "1e-4", "--iterations", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["lr", "loss", "smoothed"] and 2 <= len(rows) <= 20
    lrs, smoothed = ([float(row[key]) for row in rows] for key in ("lr", "smoothed"))
    assert lrs[0] == pytest.approx(1e-4)
    assert np.allclose(np.diff(np.log(lrs)), math.log(10 / 1e-4) / 19)  # 20 steps to 10
    want = f"{max(lrs[int(np.argmin(smoothed))] / 10, lrs[0]):.3g}"
    assert re.search(r"suggested lr (\S+) \(min/10; steepest", result.stdout).group(1) == want
    assert f"; wrote {out}/lr_find.png and lr_find.csv. Train with --lr {want}, or let " \
        in result.stdout, result.stdout


def test_the_plot_shows_the_curve_not_the_loss_of_the_step_that_diverged():
    """A diverged sweep's last step has a huge loss (the smoothed loss passes 4x its best only
    after one): the y axis is cut above the start, and must be cut below the curve too. Left
    to matplotlib, the bottom went as far below the curve as that loss lies above it (-150 for
    a last loss of 3086), and the whole curve was a flat line along the top. A step's loss
    below the smoothed curve (a lucky batch) is drawn too, not cut off under the axis."""
    lrs = np.geomspace(1e-4, 31, 55).tolist()
    smoothed = [2.5 - 0.01 * i for i in range(54)] + [95.0]
    losses = smoothed[:50] + [1.5] + smoothed[51:54] + [3086.0]
    result = lr_range.RangeTest(lrs, losses, smoothed, *lr_range.suggestions(lrs, smoothed),
                                diverged=True)
    bottom, top = lr_curve.plot(result).axes[0].get_ylim()
    low, high = min(losses), 1.5 * smoothed[0]
    assert low - 0.1 * (high - low) <= bottom <= low  # every point of the curve drawn
    assert high <= top <= high + 0.1 * (high - low)
    assert (high - low) / (top - bottom) > 0.8  # the curve fills the axis


def test_the_plot_marks_each_suggestion_at_its_lr_on_a_log_axis_and_titles_the_suggestion():
    """What a user reads the LR off: a log LR axis, a dashed line at the steepest descent's
    LR and one at the minimum / 10, each labelled with its own value, and the suggested LR in
    the title, with where the sweep diverged only for a sweep that did."""
    lrs = np.geomspace(1e-4, 0.5, 40).tolist()
    losses = [2.3 - 0.02 * i for i in range(40)]
    result = lr_range.RangeTest(lrs, losses, losses, 1e-3, 2e-2, diverged=True)
    ax = lr_curve.plot(result).axes[0]
    assert ax.get_xscale() == "log"
    marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()
             if line.get_linestyle() == "--"}
    assert marks == {"steepest descent: 0.001": 1e-3, "minimum / 10: 0.02 (suggested)": 2e-2}
    assert ax.get_title() == "LR range test: suggested lr 0.02 (diverged at 0.5)"
    ax = lr_curve.plot(replace(result, diverged=False)).axes[0]
    assert ax.get_title() == "LR range test: suggested lr 0.02"


def test_lr_find_csv_has_each_steps_loss_beside_its_smoothed_loss():
    """A row per step: its LR, the raw loss of that step and the running EMA, each in its
    own column."""
    lrs, losses = [1e-3, 1e-2, 1e-1], [2.3, 2.0, 9.0]
    smoothed = [2.3, 2.2, 4.1]
    result = lr_range.RangeTest(lrs, losses, smoothed, 1e-2, 1e-3, diverged=True)
    assert lr_curve.rows(result) == [dict(lr=1e-3, loss=2.3, smoothed=2.3),
                                     dict(lr=1e-2, loss=2.0, smoothed=2.2),
                                     dict(lr=1e-1, loss=9.0, smoothed=4.1)]


@pytest.mark.parametrize("args, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "start-lr"),
    (["--end-lr", "inf"], "--end-lr <= 3.4e+38 (the float32 weights' largest)"),
    (["--start-lr", "1e-320"], "--end-lr / --start-lr (10 / 9.99989e-321) overflows to "
                               "infinity; raise --start-lr (the default is 1e-07)"),
    (["--iterations", "5"], "--iterations must be at least 20: the first 10 steps"),
    (["--iterations", "100000000000"], "--iterations must be at most 100,000 (the default is "
                                       "100), got 100,000,000,000"),
    (["--resume", "somewhere"], "unrecognized arguments: --resume"),
    (["--optimizer", "lion"], "invalid choice"),
    # a training option's refusal names the tool, not engine/train.py
    (["--momentum", "1"], "tools/lr_find.py: error: --momentum must be in [0, 1), got 1.0"),
    (["--lr", "0.1"], "--lr: the range test does not use it (it sweeps the LR from"),
    (["--epochs", "3", "--no-tta"], "--epochs, --no-tta: the range test does not use them (it "
     "sweeps the LR from --start-lr to --end-lr over --iterations steps and never evaluates); "
     "leave them out here, and pass them to engine/train.py; see --help\n"),
    (["--tta"], "--tta: the range test does not use it"),
    # the sweep sets the LR of each step itself
    (["--schedule", "onecycle", "--warmup", "0.2"],
     "--schedule, --warmup: the range test does not use them"),
    # the sweep never evaluates: a tracker would log no epoch
    (["--log-with", "tensorboard"], "--log-with: the range test does not use it"),
])
def test_lr_find_refuses_bad_options_with_a_usage_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        lr_find.main([*args, "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_sweep_that_fails_leaves_no_out_folder_it_made(tmp_path, capsys):
    """fp16 fails on the CPU once --out is made (it is made first, to refuse a bad one): the
    folder goes again, as engine/train.py's does; a folder that was there stays."""
    for out, existed in ((tmp_path / "new", False), (tmp_path, True)):
        code = lr_find.main([*SMALL, "--data-dir", str(tmp_path / "data"), "--precision",
                             "fp16", "--out", str(out)])
        assert code == 1 and "--precision fp16 needs a CUDA GPU" in capsys.readouterr().err
        assert out.is_dir() == existed


def test_a_folder_in_the_plots_place_is_named_before_the_sweep(tmp_path, capsys):
    """It was named after the sweep, minutes of a full-width model on a CPU, all lost."""
    (tmp_path / "out" / "lr_find.png").mkdir(parents=True)
    assert lr_find.main([*SMALL, "--data-dir", str(tmp_path / "data"), "--out",
                         str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'out' / 'lr_find.png'} is a "
                                       "folder; writing it would replace that. Move it away, "
                                       "or write elsewhere.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no data prepared


@pytest.mark.slow
def test_a_full_disk_at_the_last_write_leaves_no_out_folder_it_made(data_dir, tmp_path):
    """lr_find.csv and .png were written after the block that removes a failed run's --out
    had ended: a full disk there left the folder, empty, where docs/lr-and-optimizers.md says
    none is left."""
    with tmpfs(tmp_path / "full", "size=24k") as full:  # the table fits, not its plot
        out = full / "lr"
        result = run_script("tools/lr_find.py", *SMALL, "--data-dir", str(data_dir),
                            "--iterations", "20", "--out", str(out))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[-1] == (f"error: the disk is full writing "
                                                  f"{out / 'lr_find.png'}; free some space or "
                                                  "write to another disk.")
        assert list(full.iterdir()) == []


def test_the_tools_help_lists_their_own_out_and_no_resume(capsys):
    """--resume continues one engine/train.py run: the tools that train do not take it."""
    with pytest.raises(SystemExit):
        lr_find.main(["--help"])
    shown = capsys.readouterr().out
    assert "runs/lr_find-<time>" in shown and "--resume" not in shown


@pytest.mark.slow
def test_train_lr_auto_trains_at_the_suggestion(data_dir, tmp_path):
    out = tmp_path / "out"
    batch = 16  # the sweep is 100 steps long: small steps keep it short
    # width 8 (SMALL's 16 halved): what is checked is where the LR comes from, not the model
    result = run_script("engine/train.py", *SMALL, "--width", "8", "--batch-size", str(batch),
                        "--data-dir", str(data_dir), "--lr", "auto", "--schedule", "onecycle",
                        "--epochs", "1", "--out", str(out))
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
    [row] = read_history(out)
    assert row["lr"] == pytest.approx(peak * lr_at("onecycle", steps, steps, config["warmup"]))

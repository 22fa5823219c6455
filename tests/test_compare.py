"""tools/compare.py as a real subprocess: one run per optimizer, one figure, one table."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    in_process,
    run_script,
    small_config,
    torchrun_env,
    wait_until,
    with_head,
)

from common.errors import OutputError
from engine import checkpoint, loop
from engine.config import TrainConfig
from engine.history import read_history
from engine.resume import resume_config
from tools import comparison
from tools.compare import main
from tools.comparison import WRITTEN, Result, default_lr, default_weight_decay

SMALL = ["--dataset", "synthetic", "--synthetic-size", "500", "200", "--width", "8",
         "--batch-size", "64", "--loader", "resident"]


def compare(*args: str) -> subprocess.CompletedProcess:
    return run_script("tools/compare.py", *args)


def compare_on_two_processes(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """tools/compare.py under torchrun, 2 CPU processes, on 400 + 100 synthetic images (in
    tmp_path/data) at width 4 and batches of 64: the shared part of the torchrun tests."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(ROOT / "tools" / "compare.py"), "--dataset", "synthetic", "--synthetic-size", "400",
         "100", "--width", "4", "--batch-size", "64", "--loader", "resident", "--data-dir",
         str(tmp_path / "data"), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=torchrun_env(tmp_path))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """sgd and adamw, one epoch each, at their default LRs and weight decays."""
    root = tmp_path_factory.mktemp("compare")
    out = root / "out"
    result = compare(*SMALL, "--data-dir", str(root / "data"), "--optimizers", "sgd", "adamw",
                     "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_compare_every_optimizer_in_turn(tmp_path):
    """Under torchrun each process trains one optimizer after the other: the first run must
    leave the process group to the second (it ended it, and the second run stopped at its
    first barrier with a traceback on both processes)."""
    out = tmp_path / "out"
    result = compare_on_two_processes(tmp_path, "--optimizers", "sgd", "adam", "--epochs", "1",
                                      "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["epochs"], r["note"]) for r in rows] == [
        ("sgd", "1", ""), ("adam", "1", "")]
    # the linear scaling rule on a step's images: 2 processes of 64 (it took 64 alone)
    assert [float(r["lr"]) for r in rows] == [0.1 * 2 * 64 / 256, 1e-3]
    for name in ("sgd", "adam"):
        assert checkpoint.load(out / name / "ckpt.pt")["processes"] == 2
    assert result.stdout.count("wrote ") == 1  # one process writes the comparison


@pytest.mark.slow
def test_under_torchrun_a_diverged_run_is_said_and_tabled_once(tmp_path):
    """Both processes diverge alike; only the first says so and writes the comparison (each
    took itself for the writer once a run failed: two error lines, two tables written)."""
    out = tmp_path / "out"
    result = compare_on_two_processes(tmp_path, "--optimizers", "sgd", "--lr", "1e12",
                                      "--schedule", "constant", "--epochs", "1", "--out", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("error: sgd: ") == 1, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("| sgd |") == 1
    with open(out / "compare.csv") as f:
        assert [r["optimizer"] for r in csv.DictReader(f)] == ["sgd"]


@pytest.mark.slow
def test_under_torchrun_a_run_refused_by_the_main_process_stops_every_process(tmp_path):
    """The main process alone checks a new run's folder: it tabled 'sgd holds config.json' as
    sgd's row and went on to adam while process 1 trained sgd, and adam's steps were averaged
    with sgd's into a row labelled adam. Now the refusal ends the comparison, in every
    process."""
    out = tmp_path / "out"
    (out / "sgd").mkdir(parents=True)
    (out / "sgd" / "config.json").write_text("{}")
    result = compare_on_two_processes(tmp_path, "--optimizers", "sgd", "adam", "--epochs", "1",
                                      "--out", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (f"error: {out / 'sgd'} holds config.json, which a run writes over; choose another "
            "--out, or move them away.") in result.stderr, result.stderr[-3000:]
    assert "adam:" not in result.stdout and not (out / "adam").exists()
    assert sorted(p.name for p in out.iterdir()) == ["sgd"]  # no compare.* written


@pytest.mark.slow
def test_compare_writes_one_figure_and_a_row_per_optimizer(out):
    assert [p.name for p in out.glob("*.png")] == ["compare.png"]
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["sgd", "adamw"]
    assert [float(r["lr"]) for r in rows] == [0.1 * 64 / 256, 1e-3]
    # AdamW's decoupled decay scaled to its LR, what each run trained with
    assert [float(r["weight_decay"]) for r in rows] == [5e-4, pytest.approx(0.05)]
    assert [json.loads((out / r["optimizer"] / "config.json").read_text())["weight_decay"]
            for r in rows] == [5e-4, pytest.approx(0.05)]
    for row in rows:
        assert 0 <= float(row["final_test_acc"]) <= float(row["best_test_acc"]) <= 1
        assert float(row["seconds_per_epoch"]) > 0 and row["epochs"] == "1" and not row["note"]
    table = (out / "compare.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ")][2:]  # after header and rule
    assert [line.split("|")[1].strip() for line in body] == ["sgd", "adamw"]
    assert [line.split("|")[3].strip() for line in body] == ["0.0005", "0.05"]
    # each at its own LR, not the preset's 0.2 that no --lr leaves in the config
    assert "LR: each optimizer's default (BASE_LRS" in table[0]
    assert "weight decay: AdamW's scaled to its LR" in table[0]


@pytest.mark.slow
def test_a_run_that_diverges_is_a_row_with_its_reason_and_the_next_one_still_runs(tmp_path):
    """An LR an optimizer cannot take is a finding of the comparison, not its end: the
    diverged run gets a note, and the optimizers after it are trained and tabled (the exit
    status is 1 all the same: a run failed)."""
    out = tmp_path / "out"
    result = compare(*SMALL, "--data-dir", str(tmp_path / "data"), "--optimizers", "sgd",
                     "adamw", "--lr", "1e12", "--schedule", "constant", "--epochs", "1",
                     "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: sgd: " in result.stderr and "error: adamw: " in result.stderr
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["sgd", "adamw"]
    # one --lr for all, so one weight decay for all: AdamW's own is scaled to its own LR
    assert [float(r["weight_decay"]) for r in rows] == [5e-4, 5e-4]
    assert "one weight decay for all" in (out / "compare.md").read_text().splitlines()[0]
    assert all("NaN or infinite in epoch 1" in r["note"] for r in rows), rows


@pytest.mark.slow
def test_a_stopped_runs_history_comes_from_its_checkpoint(out, tmp_path):
    """A diverged run's saved epochs were read from metrics.jsonl, whose hand-cut last line
    was a JSONDecodeError traceback; ckpt.pt holds them, checked as it loads."""
    run = Path(shutil.copytree(out / "sgd", tmp_path / "sgd"))
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    assert comparison.saved_history(run) == checkpoint.load(run / "ckpt.pt")["history"] != []
    assert comparison.saved_history(tmp_path / "none") == []


@pytest.mark.slow
def test_a_run_that_diverges_after_a_saved_epoch_is_tabled_with_that_epoch(out, tmp_path,
                                                                         monkeypatch, capsys):
    """Both runs extended to 2 epochs, SGD's then diverging: its row keeps its saved epoch's
    numbers (read back from its ckpt.pt) with the divergence as its note, AdamW's run after it
    trains on and is tabled with no note, and the exit status is 1: one run failed, though
    not every one. Through main() (a real subprocess diverges in the test above)."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    step = loop.train_step

    def overflowing(run, *args):  # the real step, SGD's loss then reported as infinite
        loss, correct = step(run, *args)
        return (loss * math.inf if run.cfg.optimizer == "sgd" else loss), correct

    monkeypatch.setattr(loop, "train_step", overflowing)
    code = main([*SMALL, "--data-dir", str(out.parent / "data"), "--optimizers", "sgd", "adamw",
                 "--epochs", "2", "--out", str(again)])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    sgd, adamw = (checkpoint.load(again / name / "ckpt.pt")["history"] for name in ("sgd", "adamw"))
    assert [r["epoch"] for r in sgd] == [1] and [r["epoch"] for r in adamw] == [1, 2]
    with open(again / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["epochs"], float(r["final_test_acc"])) for r in rows] == [
        ("sgd", "1", sgd[0]["test_acc"]), ("adamw", "2", adamw[1]["test_acc"])]
    assert rows[0]["note"].startswith("the training loss became NaN or infinite in epoch 2, "
                                      "batch 1") and rows[1]["note"] == ""
    assert err.count("error: ") == 1 and f"error: sgd: {rows[0]['note']}" in err


@pytest.mark.slow
def test_each_optimizer_keeps_its_own_run_directory_from_the_same_seed(out):
    for name in ("sgd", "adamw"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["optimizer"] == name and config["seed"] == 0
        assert (out / name / "ckpt.pt").is_file() and (out / name / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_the_same_command_again_reuses_finished_runs_and_extends_them(out, tmp_path, capsys):
    """A comparison stopped midway goes on when run again: finished runs are reused as they
    are, and a longer --epochs resumes each run where it stopped. The reuse through main()
    in this process (the continuing call of the weight decay test below reuses them as a real
    process), the extension a real subprocess."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    common = [*SMALL, "--data-dir", str(out.parent / "data"), "--optimizers", "sgd", "adamw",
              "--out", str(again)]
    before = {name: (again / name / "ckpt.pt").read_bytes() for name in ("sgd", "adamw")}
    result = in_process(capsys, main, *common, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: (again / name / "ckpt.pt").read_bytes() for name in before} == before
    # compare takes no --resume: it says how to extend its runs in its own options
    assert "Extend it by running this command with a larger --epochs." in result.stdout
    assert "--resume" not in result.stdout + result.stderr
    assert (again / "compare.csv").read_text() == (out / "compare.csv").read_text()

    result = compare(*common, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("sgd", "adamw"):
        rows = read_history(again / name)
        assert [r["epoch"] for r in rows] == [1, 2]
        first = read_history(out / name)[0]
        assert rows[0] == first  # epoch 1 is the saved one, not trained again
    with open(again / "compare.csv") as f:
        assert [r["epochs"] for r in csv.DictReader(f)] == ["2", "2"]


@pytest.mark.slow
def test_compare_will_not_continue_runs_with_other_options(out, tmp_path, capsys):
    """In-process (main() returns the exit code), to save an interpreter start."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    code = main([*SMALL, "--data-dir", str(out.parent / "data"), "--optimizers", "adamw",
                 "--epochs", "1", "--width", "16", "--out", str(again)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    # said as the comparison's, as a --width (or --lr) given to the earlier one and left out
    # here would be named too
    assert err.startswith(f"error: {again / 'adamw'} holds a run of an earlier comparison that "
                          "this one cannot continue: ")
    assert f"--width cannot change when resuming {again / 'adamw'}" in err
    assert err.endswith("Give compare that comparison's options (its runs' config.json) to "
                        "continue it; an LR or weight decay it chose itself (no --lr, no "
                        "--weight-decay) comes back with the option left out.\n")


@pytest.mark.slow
def test_a_weight_decay_the_comparison_chose_is_refused_when_given_and_taken_back_left_out(
        out, tmp_path, capsys):
    """The default comparison gave AdamW 0.05; the same command with --weight-decay 5e-4, the
    others' value, is refused for AdamW, and the message says to leave the option out, which
    then continues the runs (their config.json's 0.05 would refuse SGD instead). The refused
    call in-process (main() returns the exit code), the one that continues a real subprocess."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    common = [*SMALL, "--data-dir", str(out.parent / "data"), "--optimizers", "sgd", "adamw",
              "--epochs", "1", "--out", str(again)]
    code = main([*common, "--weight-decay", "5e-4"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert f"--weight-decay cannot change when resuming {again / 'adamw'}" in err
    assert "comes back with the option left out." in err
    assert compare(*common).returncode == 0


@pytest.mark.slow
def test_fewer_epochs_than_a_run_has_done_stops_the_comparison_and_keeps_its_files(
        out, tmp_path, capsys):
    """A refused option is no finding about an optimizer: it was a row of the table ('--epochs 1
    is fewer than the 2 epochs ...'), and compare.png, .csv and .md were written over with it.
    Both calls through main() in this process (it returns the exit code): the extension of a
    run is a real subprocess in the same-command-again test."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    common = [*SMALL, "--data-dir", str(out.parent / "data"), "--out", str(again)]
    extended = in_process(capsys, main, *common, "--optimizers", "sgd", "--epochs", "2")
    assert extended.returncode == 0, extended.stderr[-3000:]  # its output read: the refusal's next
    before = {name: (again / name).read_bytes() for name in WRITTEN}
    code = main([*common, "--optimizers", "sgd", "adamw", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err == (f"error: --epochs 1 is fewer than the 2 epochs {again / 'sgd'} has done; "
                   "pass --epochs above 2 to extend it.\n")
    assert {name: (again / name).read_bytes() for name in WRITTEN} == before


@pytest.mark.slow
def test_an_option_only_a_later_run_refuses_stops_the_comparison_before_any_run_trains(
        out, tmp_path, capsys):
    """--weight-decay 5e-4 is SGD's saved value but not AdamW's own 0.05: SGD's run was
    resumed and trained its second epoch before AdamW's refused the option, leaving the runs
    at 2 and 1 epochs and compare.* of neither. Each saved run is checked first now."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    before = {path: path.read_bytes() for path in again.rglob("*") if path.is_file()}
    result = in_process(capsys, main, *SMALL, "--data-dir", out.parent / "data",
                        "--optimizers", "sgd", "adamw", "--epochs", "2", "--weight-decay",
                        "5e-4", "--out", again)
    assert result.returncode == 1 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {again / 'adamw'} holds a run of an earlier "
                                    "comparison that this one cannot continue: ")
    assert f"--weight-decay cannot change when resuming {again / 'adamw'}" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in again.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_fewer_epochs_than_a_later_run_has_done_stops_the_comparison_before_any_run_trains(
        out, tmp_path, capsys):
    """nesterov, new, trained a whole run before AdamW's 2 epochs refused --epochs 1; now
    nothing trains, and no nesterov folder is left."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    common = [*SMALL, "--data-dir", out.parent / "data", "--out", again]
    extended = in_process(capsys, main, *common, "--optimizers", "adamw", "--epochs", "2")
    assert extended.returncode == 0, extended.stderr[-3000:]
    before = {path: path.read_bytes() for path in again.rglob("*") if path.is_file()}
    result = in_process(capsys, main, *common, "--optimizers", "nesterov", "adamw", "--epochs",
                        "1")
    assert result.returncode == 1 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr == (f"error: --epochs 1 is fewer than the 2 epochs {again / 'adamw'} "
                             "has done; pass --epochs above 2 to extend it.\n")
    assert not (again / "nesterov").exists()
    assert {path: path.read_bytes() for path in again.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_an_lr_compare_derived_is_refused_in_words_not_as_an_option_never_typed(
        out, tmp_path, capsys):
    """Another --batch-size moves SGD's LR, which compare derives from it (no --lr): the
    refusal named '--batch-size, --lr', an option the command never had."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    result = in_process(capsys, main, *SMALL, "--data-dir", out.parent / "data",
                        "--optimizers", "sgd", "adamw", "--epochs", "1", "--batch-size", "32",
                        "--out", again)
    assert result.returncode == 1 and result.stdout == "", result.stderr[-3000:]
    assert (f"{again / 'sgd'}/ckpt.pt: --batch-size (and the LR compare derives from the batch "
            f"size) cannot change when resuming {again / 'sgd'}, ") in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_weight_decay_compare_chose_is_refused_in_words():
    """An earlier comparison's --weight-decay 1e-3 left out now: AdamW's own 0.05 differs,
    and the refusal names no --weight-decay, which this command did not give."""
    saved = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-3).to_dict()
    given = {"optimizer": "adamw", "lr": 1e-3,
             "weight_decay": default_weight_decay("adamw", 5e-4)}
    with pytest.raises(ValueError) as refused:
        resume_config(saved, given, Path("runs/x"),
                      comparison.derived_words("adamw", own_lrs=True, own_decay=True))
    assert str(refused.value).startswith("the weight decay compare chooses for adamw cannot "
                                         "change when resuming runs/x, ")


@pytest.mark.parametrize("optimizer, own_lrs, own_decay, names", [
    ("adamw", True, True, "the LR compare chooses for adamw and the weight decay compare "
                          "chooses for adamw"),
    ("sgd", False, True, "--lr (and the weight decay compare chooses for sgd)"),
    ("nesterov", True, False, "--weight-decay (and the LR compare derives from the batch size)"),
], ids=["both chosen", "an lr given", "a weight decay given"])
def test_a_refusal_names_the_options_given_and_words_only_the_values_compare_chose(
        optimizer: str, own_lrs: bool, own_decay: bool, names: str) -> None:
    """An LR and a weight decay that both changed: those compare chose itself are said in its
    words, joined by 'and' (an AdamW LR by the optimizer's name: only SGD's follows the batch
    size), and one the command gave (--lr, --weight-decay) by its option, as typed."""
    saved = TrainConfig(optimizer=optimizer, lr=1e-3, weight_decay=1e-3).to_dict()
    given = {"optimizer": optimizer, "lr": 2e-3, "weight_decay": 2e-3}
    with pytest.raises(ValueError) as refused:
        resume_config(saved, given, Path("runs/x"),
                      comparison.derived_words(optimizer, own_lrs=own_lrs, own_decay=own_decay))
    assert str(refused.value).startswith(f"{names} cannot change when resuming runs/x, ")


@pytest.mark.slow
def test_a_folder_in_a_comparison_files_place_is_named_before_the_runs(out, tmp_path, capsys):
    """compare.md a folder: the runs trained, then compare.png and compare.csv were written
    over and compare.md refused, a comparison of two states; now nothing trains or changes.
    In-process (main() returns the exit code)."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    (again / "compare.md").unlink()
    (again / "compare.md").mkdir()
    before = {name: (again / name).read_bytes() for name in ("compare.png", "compare.csv")}
    code = main([*SMALL, "--data-dir", str(out.parent / "data"), "--optimizers", "sgd", "adam",
                 "--epochs", "2", "--out", str(again)])
    stdout, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err == (f"error: {again / 'compare.md'} is a folder; writing it would replace that. "
                   "Move it away, or write elsewhere.\n")
    assert stdout == ""  # no run resumed
    assert {name: (again / name).read_bytes() for name in before} == before


def test_a_file_in_an_optimizers_place_is_named_before_the_runs(tmp_path):
    """It was named after the runs before it had trained, as '--out OUT/adam is a file', an
    --out never given. A real subprocess: the refusal, exit code and stderr of the command
    itself (the other refusals run its main() in this process)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "adam").write_text("mine")
    result = compare(*SMALL, "--data-dir", str(tmp_path / "data"), "--optimizers", "sgd",
                     "adam", "--epochs", "1", "--out", str(out))
    assert result.returncode == 1 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr == (f"error: {out / 'adam'} is a file, not a folder, where the adam "
                             "run of the comparison goes; move it away, or choose another "
                             "--out.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no data prepared
    assert sorted(p.name for p in out.iterdir()) == ["adam"]


def test_the_comparison_files_are_written_all_or_none(out, tmp_path):
    """A write that fails (here compare.md's, a folder since the check) leaves the earlier
    compare.png and compare.csv as they were."""
    again = Path(shutil.copytree(out, tmp_path / "out"))
    before = {name: (again / name).read_bytes() for name in WRITTEN}
    cfg = TrainConfig(epochs=1, out=str(again))
    results = [Result("sgd", 0.1, 5e-4, [dict(epoch=1, test_acc=0.5, train_loss=1.0, lr=0.0,
                                        seconds=1.0)])]
    (again / "compare.md").unlink()
    (again / "compare.md").mkdir()
    with pytest.raises(OutputError, match="compare.md is a folder"):
        comparison.write_report(results, cfg, "test", again)
    assert {name: (again / name).read_bytes() for name in WRITTEN[:2]} == \
        {name: before[name] for name in WRITTEN[:2]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a CUDA GPU")
def test_an_option_this_machine_cannot_run_is_said_once_and_leaves_no_table(tmp_path, capsys):
    """--precision fp16 on the CPU fails every optimizer alike: it was said once per optimizer
    and tabled as their results, in a compare.csv of empty rows. In-process (main() returns
    the exit code)."""
    out = tmp_path / "out"
    code = main([*SMALL, "--data-dir", str(tmp_path / "data"), "--optimizers", "sgd", "adam",
                 "--epochs", "1", "--precision", "fp16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err == "error: --precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU.\n"
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_in_the_first_run_leaves_no_out_folder(out, tmp_path):
    """Stopped before any run saved an epoch: the --out it made goes, as engine/train.py's,
    and so does the folder it made above it (new/)."""
    again = tmp_path / "new" / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "compare.py"), *SMALL, "--width", "64",
         "--data-dir", str(out.parent / "data"), "--optimizers", "sgd", "--epochs", "1",
         "--out", str(again)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    # an early exit goes on to the assertions below, which show its stderr
    wait_until(lambda: (again / "sgd" / ".lock").exists() or process.poll() is not None, 300,
               "sgd's run never locked its folder")
    process.send_signal(signal.SIGINT)  # a width-64 epoch is seconds away: none is saved
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped during sgd" in stderr, stderr[-3000:]
    assert "before any run saved an epoch; run the same command again" in stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_reader_of_the_output_gone_says_the_comparisons_way_on(out, tmp_path):
    """`compare.py | head -1`: the line saying so says how the comparison goes on (the same
    command with its --out), not the --resume of the one run it stopped in."""
    again = tmp_path / "out"
    line, code, stderr = with_head("tools/compare.py", *SMALL, "--data-dir", out.parent / "data",
                                   "--optimizers", "sgd", "adam", "--epochs", 3, "--out", again)
    assert line.startswith("sgd: synthetic on cpu") and code == 1, stderr[-3000:]
    assert (again / "sgd" / "ckpt.pt").exists() and not (again / "adam").exists()
    assert stderr.endswith(
        "keep its reader running. stopped during sgd; to go on, run the same command with "
        f"--out {again}: its runs are resumed, or reused when finished.\n"), stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "sgd", "lion"], "invalid choice"),
    (["--optimizers", "sgd", "adam", "sgd"], "--optimizers names one twice: sgd adam sgd; "
                                             "see --help"),
    (["--epochs", "0"], "tools/compare.py: error: --epochs must be at least 1; see --help"),
    (["--optimizer", "adam"], "--optimizer adam: this tool trains each of --optimizers; pass "
                              "--optimizers adam; see --help"),
    (["--resume", "runs/a"], "--resume runs/a: this tool goes on where it stopped when run again "
                             "with the same options and --out runs/a, which resumes its runs"),
])
def test_compare_refuses_bad_options_with_a_usage_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*args, "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_help_lists_no_resume_which_the_same_command_again_replaces(capsys) -> None:
    """--resume is taken only to say what does its work here (the same command with --out):
    the help, which lists the training options this tool takes, leaves it out."""
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "--optimizers" in shown and "--resume" not in shown


def test_an_out_that_is_a_file_is_named_before_any_run(tmp_path, capsys):
    (tmp_path / "notes").write_text("kept")
    assert main([*SMALL, "--data-dir", str(tmp_path / "data"), "--optimizers", "sgd",
                 "--out", str(tmp_path / "notes")]) == 1
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'notes'} is a file, not a "
                                       "folder; choose a writable folder.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no data prepared


def test_default_lrs_follow_the_linear_scaling_rule_for_sgd_only():
    assert default_lr("nesterov", 512) == pytest.approx(0.2)  # the fast preset's peak
    # the rule's batch is a step's: every process's images together
    assert default_lr("sgd", 256, processes=4) == default_lr("sgd", 1024) == pytest.approx(0.4)
    assert default_lr("adam", 256, processes=4) == 1e-3
    assert default_lr("adamw", 512) == default_lr("adamw", 128) == 1e-3
    for adaptive in ("adam", "adamw", "rmsprop"):  # their 1e-3 holds at any batch size
        assert default_lr(adaptive, 1024) == default_lr(adaptive, 64) == 1e-3, adaptive


def test_adamws_own_weight_decay_shrinks_its_weights_per_step_as_sgds_does():
    """At their own LRs (batch 256), AdamW's decoupled decay (lr x wd per step) takes off what
    SGD's L2 term does in one step before momentum (lr x wd x w); the others take the run's
    weight decay as it is."""
    for wd in (5e-4, 1e-3, 0.0):
        adamw = default_weight_decay("adamw", wd)
        assert default_lr("adamw", 256) * adamw == pytest.approx(default_lr("sgd", 256) * wd)
        for name in ("sgd", "nesterov", "adam", "rmsprop"):
            assert default_weight_decay(name, wd) == wd
    assert default_weight_decay("adamw", 5e-4) == pytest.approx(0.05)


def test_a_row_gives_the_last_and_best_accuracy_and_the_median_epoch_time():
    """compare.csv and compare.md: a run whose accuracy fell at the end has a best above its
    final figure, and s/epoch is per epoch, not the run's total, and leaves out the first
    epoch, the warm-up: on a GPU it holds the compile, the CUDA graphs' recording and, in the
    first optimizer's run alone, cuDNN's autotuning (40 s here beside steady epochs of 1 s:
    the mean with it, 13 s, said that the run's optimizer was slow). The median, as the GPU
    suite's summary takes it: one epoch slowed by the machine (10 s) moves it no more."""
    history = [dict(test_acc=0.5, seconds=40.0), dict(test_acc=0.7, seconds=1.0),
               dict(test_acc=0.65, seconds=10.0), dict(test_acc=0.6, seconds=1.0)]
    row = Result("sgd", 0.1, 5e-4, history).row()
    assert (row["final_test_acc"], row["best_test_acc"]) == (0.6, 0.7)
    assert row["seconds_per_epoch"] == pytest.approx(1.0) and row["epochs"] == 4
    # a one-epoch run has only its warm-up to give
    one = Result("sgd", 0.1, 5e-4, history[:1]).row()
    assert one["seconds_per_epoch"] == pytest.approx(40.0) and one["epochs"] == 1


def test_the_figure_names_each_run_with_its_lr_and_weight_decay():
    history = [dict(epoch=1, train_loss=1.0, test_acc=0.5, lr=0.1, seconds=1.0)]
    fig = comparison.plot([Result("sgd", 0.1, 5e-4, history), Result("adamw", 1e-3, 0.05,
                                                                     history)])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "sgd (lr 0.1, wd 0.0005)", "adamw (lr 0.001, wd 0.05)"]


@pytest.mark.parametrize("epochs, said", [(1, "1 epoch of synthetic,"),
                                          (3, "3 epochs of synthetic,")])
def test_the_tables_first_line_counts_the_epochs_in_words(epochs, said):
    """A one-epoch comparison's compare.md began "1 epochs of synthetic"."""
    cfg = TrainConfig(dataset="synthetic", epochs=epochs)
    text = comparison.markdown([Result("sgd", 0.1, 5e-4, [dict(test_acc=0.5, seconds=1.0)]).row()],
                               cfg, "each optimizer's default")
    assert text.startswith(said)


def test_the_figure_gives_test_accuracy_in_percent_as_the_table_does():
    """compare.png drew fractions (0.09 to 0.10) beside compare.md's 9.00% and 10.00%."""
    results = [Result("sgd", 0.2, 5e-4, [dict(epoch=1, test_acc=0.09, train_loss=2.3, lr=0.1),
                                         dict(epoch=2, test_acc=0.104, train_loss=2.2, lr=0.0)])]
    accuracy = comparison.plot(results).axes[1]
    assert accuracy.get_title() == "test accuracy (%)"
    assert list(accuracy.lines[0].get_ydata()) == pytest.approx([9.0, 10.4])


def test_the_table_gives_each_runs_numbers_in_its_own_column_and_a_diverged_runs_reason():
    """compare.md's cells under their headers, in --optimizers' order: accuracies in percent,
    s/epoch to a tenth, and a diverged run's dashes and the first clause of its error (what
    happened), its advice left to the error line."""
    finished = Result("sgd", 0.0234375, 5e-4, [dict(test_acc=0.5, seconds=40.0),
                                               dict(test_acc=0.7, seconds=1.0),
                                               dict(test_acc=0.65, seconds=1.3),
                                               dict(test_acc=0.6, seconds=2.0)])
    # AdamW's own weight decay at --weight-decay 7e-4, 0.06999999999999999
    diverged = Result("adamw", 1e-3, default_weight_decay("adamw", 7e-4), [],
                      "the training loss became NaN or infinite in epoch 1; no epoch had "
                      "finished, so nothing was saved")
    text = comparison.markdown([finished.row(), diverged.row()], TrainConfig(epochs=3), "x")
    lines = text.splitlines()
    assert lines[2] == ("| optimizer | lr | weight decay | final test acc | best test acc | "
                        "s/epoch | note |")
    assert lines[4:] == ["| sgd | 0.0234 | 0.0005 | 60.00% | 70.00% | 1.3 |  |",
                         "| adamw | 0.001 | 0.07 | - | - | - | the training loss became NaN or "
                         "infinite in epoch 1 |"]


def test_a_pipe_where_a_run_of_the_comparison_goes_is_named_a_pipe(tmp_path):
    """check_places: a pipe at --out/sgd is refused before any run, as a pipe, not 'a file'."""
    os.mkfifo(tmp_path / "sgd")
    with pytest.raises(OutputError) as refused:
        comparison.check_places(tmp_path, ["sgd"])
    assert str(refused.value) == (f"{tmp_path / 'sgd'} is a device, pipe or socket, not a "
                                  "folder, where the sgd run of the comparison goes; move it "
                                  "away, or choose another --out.")


@pytest.mark.parametrize("lr, own_decay, optimizers, said", [
    (None, True, ["sgd", "adamw"], "each optimizer's default (BASE_LRS in tools/comparison.py); "
     "weight decay: AdamW's scaled to its LR (default_weight_decay in tools/comparison.py)"),
    # no AdamW to scale for: `compare --optimizers sgd adam` named AdamW's decay all the same
    (None, True, ["sgd", "adam"], "each optimizer's default (BASE_LRS in tools/comparison.py); "
                                  "one weight decay for all"),
    (None, False, ["sgd", "adamw"], "each optimizer's default (BASE_LRS in "
                                    "tools/comparison.py); one weight decay for all"),
    ("auto", False, ["adamw"], "each optimizer's LR range test suggestion (--lr auto); one "
                               "weight decay for all"),
    (0.05, False, ["sgd", "adamw"], "--lr 0.05 for all; one weight decay for all"),
])
def test_the_tables_caption_says_where_the_lrs_and_weight_decays_came_from(lr, own_decay,
                                                                            optimizers, said):
    assert comparison.lr_source(lr, own_decay, optimizers) == said


def test_the_report_writes_the_figure_the_csv_and_the_table_it_shows(tmp_path):
    """compare.csv has a row per run with every column, the note included, in --optimizers'
    order; compare.md is the table compare prints; compare.png a PNG."""
    history = [dict(epoch=1, test_acc=0.5, train_loss=1.0, lr=0.1, seconds=2.0)]
    results = [Result("sgd", 0.1, 5e-4, history),
               Result("adam", 1e-3, 5e-4, [], "the test loss became NaN or infinite in epoch 1")]
    table = comparison.write_report(results, TrainConfig(epochs=1), "test", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(WRITTEN)
    assert (tmp_path / "compare.md").read_text() == table
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "compare.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == comparison.FIELDS
    assert rows == [
        dict(optimizer="sgd", lr="0.1", weight_decay="0.0005", final_test_acc="0.5",
             best_test_acc="0.5", seconds_per_epoch="2.0", epochs="1", note=""),
        dict(optimizer="adam", lr="0.001", weight_decay="0.0005", final_test_acc="",
             best_test_acc="", seconds_per_epoch="", epochs="0",
             note="the test loss became NaN or infinite in epoch 1")]


def test_the_figure_names_an_lr_in_three_digits_and_draws_lrs_on_a_log_scale():
    """An LR scaled to the batch (0.1 x 60 / 256) is named as the table gives it; the LRs of
    SGD and Adam lie two decades apart, on a log scale."""
    history = [dict(epoch=1, train_loss=1.0, test_acc=0.5, lr=0.0234375)]
    fig = comparison.plot([Result("sgd", 0.0234375, 5e-4, history),
                           Result("adam", 1e-3, 5e-4, [dict(history[0], lr=1e-3)])])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "sgd (lr 0.0234, wd 0.0005)", "adam (lr 0.001, wd 0.0005)"]
    assert fig.axes[2].get_yscale() == "symlog"


@pytest.mark.slow
def test_an_lr_the_range_test_chose_is_tabled_as_the_number_it_trained_at(prepared, tmp_path):
    """--lr auto: each row, compare.csv's and compare.md's, gives the LR the run's range test
    suggested and the run trained at (its config.json's), not 'auto'. Batches of 16: the
    sweep is 100 steps long."""
    cfg = small_config(prepared, tmp_path, batch_size=16, epochs=1, lr="auto")
    out = Path(cfg.out)
    results, table = comparison.compare(cfg, ["nesterov"], False, False, log=lambda _: None,
                                        warn=pytest.fail)
    lr = json.loads((out / "nesterov" / "config.json").read_text())["lr"]
    assert isinstance(lr, float) and [r.lr for r in results] == [lr]
    with open(out / "compare.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [lr]
    assert f"| nesterov | {lr:.3g} | " in table
    assert "LR range test suggestion (--lr auto)" in table.splitlines()[0]

"""--resume DIR: what a resumed run may change (RESUMABLE), and the config and checkpoint it
continues from, checked against the machine it resumes on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from common.cli import option_name
from common.errors import CheckpointError, DataError, TrainingError
from common.hardware import beyond_cores
from engine import checkpoint
from engine.config import AUTOTUNE_REFUSED, TrainConfig, default_compile_mode, field_value
from loaders.download import Unfetched

# What --resume DIR may change: how long to train, where the data and workers are, the
# trackers, and how the same computation runs (compiled or not, its mode, determinism, cuDNN's
# autotuning). Everything else would make the continued run a different run.
RESUMABLE = ("epochs", "data_dir", "workers", "log_with", "compile", "compile_mode",
             "deterministic", "cudnn_benchmark")


def resume_config(saved: dict, given: dict, run_dir: Path,
                  derived: dict[str, str] | None = None) -> TrainConfig:
    """The config a --resume continues: the saved one, with the RESUMABLE options applied.

    Any other option given on the command line is refused by name rather than dropped, and
    so is --cudnn-benchmark where the resumed run stays --deterministic (it never autotunes).
    `derived` words the values of `given` that a tool chose itself (tools/compare.py's LRs
    and weight decays), which no option typed set: key -> how a refusal names it.
    """
    refused = sorted(k for k, v in given.items()
                     if k not in RESUMABLE and not repeated(k, v, saved, run_dir))
    if refused:
        names = refused_names(refused, derived or {})
        allowed = ", ".join(map(option_name, RESUMABLE))
        raise ValueError(f"{names} cannot change when resuming {run_dir}, which continues with "
                         f"its saved config; only {allowed} can. Start a new run with another "
                         "--out to change the rest.")
    changes = {k: v for k, v in given.items() if k in RESUMABLE}
    if changes.get("compile") is False:  # --no-compile: no mode left to compile in
        changes.setdefault("compile_mode", "default")
    if changes.get("cudnn_benchmark") and changes.get("deterministic", saved.get("deterministic")):
        raise ValueError(f"{AUTOTUNE_REFUSED} (resuming {run_dir} deterministically); "
                         "pass --no-deterministic too, or leave --cudnn-benchmark out.")
    return TrainConfig(**{**saved, **changes, "out": str(run_dir)})


def refused_names(refused: list[str], derived: dict[str, str]) -> str:
    """The refused options as the refusal names them: by option name, then in brackets the
    values a tool chose itself, in `derived`'s words (no option of theirs was typed, so naming
    one would send the user looking for it)."""
    named = ", ".join(option_name(k) for k in refused if k not in derived)
    chosen = " and ".join(derived[k] for k in refused if k in derived)
    return f"{named} (and {chosen})" if named and chosen else named or chosen


def repeated(key: str, value: object, saved: dict, run_dir: Path) -> bool:
    """Whether option `key`, given as `value`, says what the resumed run already has: its
    saved value; --lr auto, the saved LR's origin; an --out naming its folder, however written
    (./runs/x, an absolute path; the saved one is as the last --resume wrote it)."""
    if key == "out":  # realpath: links in a loop, refused later as --out, raise no error here
        return os.path.realpath(value) == os.path.realpath(run_dir)
    return field_value(saved.get(key)) == value or (
        key == "lr" and value == "auto" and bool(saved.get("lr_auto")))


def check_best(run_dir: Path, ckpt: dict) -> None:
    """CheckpointError where run_dir's best.pt is not of the run its ckpt.pt (`ckpt`) holds:
    another run's ckpt.pt, or an older one of this run, copied over it. The run, finished or
    extended, would go on claiming best.pt's weights as its best. best.pt holds the history up
    to its epoch, so it must begin ckpt.pt's; a run without best.pt (moved away) resumes.
    write_epoch renames best.pt before ckpt.pt, so a run cut between the two renames (kill -9,
    power lost) is refused too: its best.pt is of an epoch that would be trained again, and
    a retrained epoch that is not the best would leave best.pt of the first try."""
    best_path, path = run_dir / "best.pt", run_dir / "ckpt.pt"
    if not best_path.exists():
        return
    try:
        best = checkpoint.load(best_path)
    except CheckpointError as error:  # damaged or foreign: load's words, then resume's fix
        raise CheckpointError(f"{error} To resume {run_dir}, move {best_path} away or delete "
                              "it.") from None
    if best["history"] != ckpt["history"][:len(best["history"])]:
        raise CheckpointError(
            f"{best_path} is not from the run {path} holds (their histories differ: another "
            "run's ckpt.pt, or an older one of this run, copied over it? or the run killed "
            f"between saving the two?). Put back the ckpt.pt of {best_path}'s run, or move "
            f"{best_path} away (or delete it) to resume without it.")


def saved_run(resume: Path, given: dict,
              derived: dict[str, str] | None = None) -> tuple[TrainConfig, dict]:
    """The config (not yet resolved for this machine) and the checkpoint of the run in
    `resume`, with the options `given` on the command line applied (`derived`: resume_config's);
    CheckpointError or TrainingError, saying what to change, for a run this machine cannot
    continue as asked."""
    if Path(resume).is_file():
        raise CheckpointError(f"--resume takes the run folder, not a file; use --resume "
                              f"{Path(resume).parent}")
    path = Path(resume) / "ckpt.pt"
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: {path} does not exist; pass the --out folder "
                              "of a run that saved an epoch.")
    ckpt = checkpoint.load(path)
    checkpoint.check_epoch_files(Path(resume))
    check_best(Path(resume), ckpt)
    # the data folder recorded as an absolute path: resuming from elsewhere finds the same data
    saved = {**ckpt["config"], "data_dir": ckpt["data"]["data_dir"]}
    if (saved.get("dataset") == "folder" and "data_dir" not in given
            and not Path(saved["data_dir"]).is_dir()):
        # CIFAR and synthetic data are fetched or made again; pictures are only where they are
        raise CheckpointError(
            f"{path} was trained on the image folder {saved['data_dir']}, which does not exist "
            "(moved or deleted?); pass --data-dir DIR, the folder that now holds its train/ "
            "and test/ (--resume may change it).")
    # a compile mode the run's own machine picked (none was asked for) is picked again for
    # this one: CUDA graphs trained on one GPU would otherwise go on under DDP, or the reverse
    trained_on_cuda = not str(ckpt.get("device", "cpu")).startswith("cpu")
    if "compile_mode" not in given and saved.get("compile_mode") == default_compile_mode(
            trained_on_cuda, saved.get("compile"), ckpt.get("processes", 1)):
        saved["compile_mode"] = None
    try:
        cfg = checkpoint.checked_config(
            path, ckpt, lambda: resume_config(saved, given, Path(resume), derived),
            fix=checkpoint.RESUME_FIX)
    except ValueError as error:  # an option that --resume cannot change
        raise CheckpointError(f"{path}: {error}") from None
    if cfg.workers is not None and "workers" not in given and (
            problem := beyond_cores("--workers", cfg.workers)):
        raise TrainingError(f"{resume} was trained with {problem} (--resume may change it).")
    if cfg.precision == "fp16" and not torch.cuda.is_available():  # --precision is kept
        raise TrainingError(f"{path} trained in fp16, which needs a CUDA GPU; resume it on a "
                            "machine with one (--resume keeps the run's --precision).")
    done = len(ckpt["history"])
    if cfg.epochs < done:
        raise TrainingError(f"--epochs {cfg.epochs} is fewer than the {done} epochs {resume} "
                            f"has done; pass --epochs above {done} to extend it.")
    return cfg, ckpt


@contextmanager
def download_fix(run_dir: Path) -> Iterator[None]:
    """A failed download of the data of the run resumed from `run_dir` (its CIFAR folder moved
    or emptied since) said with a resume's fix: --data-dir, which --resume may change, not
    --dataset synthetic, which it may not."""
    try:
        yield
    except Unfetched as error:
        raise DataError(f"{error.failure} To resume {run_dir} offline, pass --data-dir DIR, the "
                        "folder that now holds its data (--resume may change it), or "
                        f"{error.place}.") from error

"""ckpt.pt and the run directory's files: written atomically, read with weights_only=True.

ckpt.pt holds plain containers and tensors only (never a pickled class), so loading a file
from elsewhere can never run code. Resume state lives in the same file, so the model and
the optimizer it continues from can never disagree.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import recursively_apply
from torch import nn

from common.atomic import atomic_writes, csv_text, json_text, text_writer, unreplaceable
from common.errors import CheckpointError, listing, one_line, plain_line
from common.hardware import device_name
from common.paths import (
    CHECKPOINT_FORMAT,
    FILE_SIZE_FIX,
    file_size_limited,
    no_file_to_read,
    room_fix,
)
from engine.config import CONFIG_KEYS, TrainConfig, foreign_values, validate
from engine.model import build_model
from engine.optimizers import load_optimizer, load_schedule, state_per_parameter
from loaders.augment import Augment
from loaders.beton import MIN_STD

if TYPE_CHECKING:
    from engine.run import Run

FORMAT = CHECKPOINT_FORMAT
VERSION = 1
# fields TrainConfig gained after version 1: an older checkpoint's config lacks them and they
# take their defaults; every other field every checkpoint's config holds
LATER_CONFIG_KEYS = {"lr_auto", "compile_mode", "deterministic", "cudnn_benchmark"}
REQUIRED = ("format", "version", "arch", "width", "num_classes", "state_dict", "classes",
            "mean", "std", "config", "history", "data")
# what every epoch writes into the run folder (best.pt only when it beats the earlier ones)
EPOCH_FILES = ("best.pt", "ckpt.pt", "metrics.jsonl", "metrics.csv", "config.json")
# what the tools read of every history row and of the data record
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
DATA_KEYS = ("dataset", "data_dir", "train", "test", "source")
# what a refused checkpoint's message asks for instead, and how a refused resume goes on
OUR_CHECKPOINT = "the ckpt.pt that engine/train.py wrote"
RESUME_FIX = f"Resume from {OUR_CHECKPOINT}, or start a new run with another --out."


def unreadable(error: Exception) -> str:
    """Why torch.load refused a file, in a few words: the weights-only unpickler's own reason
    ('Unsupported operand 35'), never torch's advice around it to retry with
    weights_only=False, which would run whatever code the file holds."""
    text = str(error)
    refused = text.partition("WeightsUnpickler error:")[2]
    if not refused and text.startswith("Weights only load failed"):
        # torch's other wording: the reason is the paragraph between its advice and its link
        refused = next((p for p in text.split("\n\n")[1:] if p.strip()
                        and not p.strip().startswith("Check the documentation")), "")
    reason = next((line.strip() for line in refused.splitlines() if line.strip()), "")
    if reason:
        return f"a weights-only load refuses it: {reason.split('. ')[0].rstrip('.')}"
    return one_line(error).split(". ")[0].rstrip(": ")  # a zip's or pickle's: its first sentence


def torch_save(tmp: Path, content: dict) -> None:
    """torch.save to `tmp`, whose zip writer reports a full disk as a RuntimeError naming no
    file: an OSError naming `tmp` instead, as common.atomic.atomic_writes expects."""
    try:
        torch.save(content, tmp)
    except RuntimeError as error:
        raise OSError(None, one_line(error), str(tmp)) from error


def unwritten(path: Path, error: OSError, kept: str | None) -> CheckpointError:
    """The error for `path` not written: what was `kept` intact (None: nothing) and the fix,
    space for a full disk (or a write torch says no more of), a higher limit for one past
    ulimit -f, else a writable folder."""
    if error.errno is None:  # torch's RuntimeError: a full disk, or past the size limit
        fix = f"{FILE_SIZE_FIX} or free some space" if file_size_limited() else "free some space"
    else:
        fix = room_fix(error, "free some space") or f"make {path.parent} writable"
    fix = fix[0].upper() + fix[1:]  # it begins a sentence
    then = (f"{kept} intact. {fix} and continue with --resume" if kept else
            f"nothing was written. {fix} (or choose another --out) and run the same command "
            "again")
    free = shutil.disk_usage(path.parent).free / 2**20
    return CheckpointError(f"could not write {path} ({error.strerror or error}); {then}. Its "
                           f"disk has {free:,.0f} MiB free.")


def load(path: Path) -> dict:
    """A validated checkpoint dict (tensors on CPU); CheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        inside = path / "ckpt.pt"
        such = f", such as {inside}" if inside.is_file() else " (a run's ckpt.pt or best.pt)"
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file{such}.")
    if not path.is_file():  # a pipe or a device is no checkpoint either, but it does exist
        why = no_file_to_read(path) or "does not exist"
        raise CheckpointError(f"{path} {why}; pass the ckpt.pt of a training run.")
    try:
        with warnings.catch_warnings():  # torch's advice on a foreign file's pickle protocol
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, pickles of classes, random bytes, ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({unreadable(error)}). It may be truncated or "
            f"come from another tool; use {OUR_CHECKPOINT}.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cifar10-engine checkpoint (no '{FORMAT}' "
                              f"marker); use {OUR_CHECKPOINT}.")
    version = ckpt.get("version")
    if type(version) is not int or version != VERSION:  # a bool or a tensor is none either
        said = version if type(version) is int else f"of type {type(version).__name__}"
        raise CheckpointError(f"{path} has checkpoint version {said}; this engine reads version "
                              f"{VERSION}. Read it with the cifar10-engine that wrote it, or "
                              "train a new run with this one.")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete (edited, or "
                              f"written by other code). Use {OUR_CHECKPOINT}.")
    wrong = [key for key, ok in shape_checks(ckpt).items() if not ok]
    if wrong:
        raise CheckpointError(f"{path} has the cifar10-engine marker but malformed "
                              f"{', '.join(wrong)}; it was damaged or written by other code. "
                              f"Use {OUR_CHECKPOINT}.")
    if why := misfit(ckpt):
        raise CheckpointError(f"{path}: its weights do not fit a {ckpt['arch']} of width "
                              f"{ckpt['width']} with {ckpt['num_classes']} classes ({why}); it "
                              f"was damaged or written by other code. Use {OUR_CHECKPOINT}.")
    # states training never saves (engine.loop.fit stops first): no model to evaluate or resume
    variances = [k for k, v in ckpt["state_dict"].items()
                 if k.endswith("running_var") and bool((v < 0).any())]  # normalized by: NaN
    for what, names in (("NaN or infinite weights", nonfinite(ckpt["state_dict"])),
                        ("negative BatchNorm variances", variances)):
        if names:
            raise CheckpointError(f"{path} holds {what} ({listing(names)}); engine/train.py "
                                  "never saves such a state, so it was damaged or written by "
                                  "other code. Use another checkpoint, e.g. the run's best.pt.")
    return ckpt


def broken_outputs(path: Path) -> CheckpointError:
    """The error for a checkpoint whose model gives NaN or infinite logits (finite weights too
    large to compute with, say): nothing a tool could show of it would mean anything."""
    return CheckpointError(f"{path}'s model gives NaN or infinite logits; its weights are "
                           "broken (a diverged run?). Use another checkpoint, e.g. the run's "
                           "best.pt.")


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` holding NaN or infinity (one host sync
    for all, wherever they are)."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite, strict=True) if not ok]


def checked_config(path: Path, ckpt: dict, build: Callable[[], TrainConfig], fix: str,
                   ) -> TrainConfig:
    """The config `build` makes of ckpt's, with the types and ranges the command line checks
    and the model and dataset of ckpt's weights and data; otherwise CheckpointError naming
    `path`, ending with `fix` (a damaged or edited config: what it asks for would be a guess)."""
    try:
        cfg = build()
    except TypeError as error:  # a value TrainConfig cannot re-type (a number for a tuple)
        problems = [str(error)]
    else:
        problems = foreign_values(cfg)
        if not problems:  # of the right types only: a tensor's != is no bool
            problems = validate(cfg)
            if (cfg.arch, cfg.width) != (ckpt["arch"], ckpt["width"]):
                problems.append(f"its config's {cfg.arch} of width {cfg.width} is not its "
                                f"weights' {ckpt['arch']} of width {ckpt['width']}")
            if cfg.dataset != ckpt["data"]["dataset"]:
                problems.append(f"its data is {ckpt['data']['dataset']!r}, its config's "
                                f"dataset {cfg.dataset!r}")
    if problems:
        raise CheckpointError(f"{path} holds a config no run could have ({'; '.join(problems)});"
                              f" it was damaged or edited. {fix}")
    return cfg


def shape_checks(ckpt: dict) -> dict[str, bool]:
    """Whether each entry has the type the rest of the engine relies on."""
    def number(x: object) -> bool:  # bool is an int to Python, never a number here
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    def numbers(x: object, n: int) -> bool:
        return isinstance(x, list | tuple) and len(x) == n and all(map(number, x))

    def count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    def resume(x: object) -> bool:  # engine/train.py's training state; best.pt has none
        if not isinstance(x, dict) or not isinstance(x.get("optimizer"), dict):
            return False
        state, groups = x["optimizer"].get("state"), x["optimizer"].get("param_groups")
        return (isinstance(state, dict) and all(isinstance(v, dict) for v in state.values())
                and isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
                and isinstance(x.get("scheduler"), dict)
                and isinstance(x.get("scaler"), dict | None)
                and isinstance(x.get("rng"), torch.Tensor) and x["rng"].dtype == torch.uint8)

    n = ckpt["num_classes"]
    return {
        "arch": isinstance(ckpt["arch"], str),
        "width": count(ckpt["width"]),
        "num_classes": count(n),
        # fp32 weights and int64 counters (BatchNorm's num_batches_tracked), as content saves
        "state_dict": isinstance(ckpt["state_dict"], dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor)
            and v.dtype in (torch.float32, torch.int64) for k, v in ckpt["state_dict"].items()),
        # as many as num_classes says, where that is a count (a tensor's == is no bool)
        "classes": isinstance(ckpt["classes"], list)
                   and (not count(n) or len(ckpt["classes"]) == n)
                   and all(isinstance(c, str) and plain_line(c) for c in ckpt["classes"]),
        "mean": numbers(ckpt["mean"], 3),
        "std": numbers(ckpt["std"], 3) and min(ckpt["std"]) >= MIN_STD,
        "config": isinstance(ckpt["config"], dict)
                  and CONFIG_KEYS - LATER_CONFIG_KEYS <= set(ckpt["config"]) <= CONFIG_KEYS,
        # one row per epoch trained, numbered from 1: a checkpoint is saved after an epoch
        "history": isinstance(ckpt["history"], list) and len(ckpt["history"]) > 0 and all(
            isinstance(r, dict) and all(number(r.get(k)) for k in HISTORY_KEYS)
            and r["epoch"] == epoch for epoch, r in enumerate(ckpt["history"], 1)),
        "data": isinstance(ckpt["data"], dict) and all(
            isinstance(ckpt["data"].get(k), str) for k in DATA_KEYS),
        "resume": "resume" not in ckpt or resume(ckpt["resume"]),
        "processes": count(ckpt.get("processes", 1)),
    }


def model_from(ckpt: dict) -> nn.Module:
    """The trained model rebuilt from a checkpoint that load() checked: fp32, eager,
    unwrapped, eval mode."""
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["width"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def model_input(ckpt: dict, device: torch.device | str) -> Augment:
    """uint8 NHWC images -> the checkpoint model's fp32 input: training's normalization, no
    augmentation, as evaluation does; contiguous, the layout of model_from's weights."""
    return Augment(None, ckpt["mean"], ckpt["std"], torch.float32, device, channels_last=False)


def misfit(ckpt: dict) -> str | None:
    """Why ckpt's weights do not fit the model its arch, width and classes name, or None.
    Compared on the meta device, without memory: an edited width (4096, say) would fill the
    machine's memory before any weight was compared."""
    def dims(shape: torch.Size | None) -> str:
        return "none" if shape is None else "x".join(map(str, shape)) or "a scalar"

    try:
        with torch.device("meta"):
            model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["width"])
    # an unknown arch, a width no tensor can have (RuntimeError) or no int64 holds (TypeError)
    except (ValueError, RuntimeError, TypeError) as error:
        return one_line(error)
    wanted = {k: v.shape for k, v in model.state_dict().items()}
    saved = {k: v.shape for k, v in ckpt["state_dict"].items()}
    wrong = [k for k in wanted if saved.get(k) != wanted[k]] + sorted(saved.keys() - wanted)
    if not wrong:
        return None
    return (f"{len(wrong)} of its tensors, such as {wrong[0]}: {dims(saved.get(wrong[0]))} "
            f"where the model has {dims(wanted.get(wrong[0]))}")


def content(run: Run, history: list[dict]) -> dict:
    """ckpt.pt's content: plain containers and fp32 CPU tensors only, copies that training
    cannot change while engine.epoch_writer writes them."""
    def copy(tensor: torch.Tensor) -> torch.Tensor:  # .cpu() of a CPU tensor is the tensor
        return tensor.detach().to("cpu", copy=True)

    weights = {k: copy(v.float() if v.is_floating_point() else v)
               for k, v in run.unwrapped.state_dict().items()}
    return dict(
        format=FORMAT, version=VERSION, arch=run.cfg.arch, width=run.cfg.width,
        num_classes=len(run.data.classes), state_dict=weights, classes=run.data.classes,
        mean=run.data.mean, std=run.data.std, config=run.cfg.to_dict(), history=list(history),
        epoch=len(history),
        data=dict(dataset=run.data.name, data_dir=str(Path(run.cfg.data_dir).resolve()),
                  train=str(run.data.train.resolve()), test=str(run.data.test.resolve()),
                  source=str(run.data.source.resolve())),
        device=device_name(run.accelerator.device), processes=run.accelerator.num_processes,
        torch=str(torch.__version__),  # a TorchVersion object would not load with weights_only
        # what --resume needs beyond the weights; the optimizer's state on the CPU too, so
        # that the file loads anywhere
        resume=dict(optimizer=recursively_apply(copy, run.optimizer.state_dict()),
                    scheduler=run.scheduler.state_dict(),
                    scaler=run.scaler.state_dict() if run.scaler else None,
                    rng=torch.get_rng_state()),
    )


def check_epoch_files(out: Path) -> None:
    """CheckpointError naming the first of a run's files in `out` that a folder, device or pipe
    has taken the place of: checked before --resume trains, whose epoch would be lost."""
    if found := unreplaceable(out / name for name in EPOCH_FILES):
        path, problem = found
        raise CheckpointError(f"{path} {problem}; each epoch of the run writes its {path.name} "
                              "there. Move it away and resume again.")


def check_space(out: Path, model: nn.Module, cfg: TrainConfig, resumed: bool) -> None:
    """CheckpointError where `out`'s disk has less free space than the run's checkpoints take:
    best.pt (the weights) and ckpt.pt (the weights and the optimizer's state), and for a new
    run of several epochs twice that, since an epoch's files (best.pt too, while the accuracy
    improves) are written beside the last epoch's before they replace them. Said before the
    first epoch, where a save would fail only once an epoch is done (a long one, on a CPU)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state = state_per_parameter(cfg.optimizer, cfg.momentum) * sum(
        p.numel() * p.element_size() for p in model.parameters())
    twice = not resumed and cfg.epochs > 1  # a resumed run's last files are there already
    need = (2 if twice else 1) * (2 * weights + state)
    free = shutil.disk_usage(out).free
    if free < need:
        raise CheckpointError(
            f"--out {out}: its disk has {free / 2**20:,.1f} MiB free, and this run's "
            f"checkpoints (width {cfg.width}, {cfg.optimizer}) need at least "
            f"{need / 2**20:,.1f} MiB (best.pt and ckpt.pt"
            f"{', two epochs of them while one replaces the other' if twice else ''}); free "
            "some space or choose another --out.")


def write_epoch(out: Path, ckpt: dict, best: bool) -> None:
    """One epoch's files: best.pt (the weights alone, when the epoch beats every earlier one),
    ckpt.pt, metrics and config.json (beside the first checkpoint, not before: a run that
    fails early leaves nothing). All are renamed into place once every one is whole, so they
    never disagree: a failed write leaves the previous epoch's files as they were."""
    history = ckpt["history"]
    writers = {
        "best.pt": lambda tmp: torch_save(tmp, {k: v for k, v in ckpt.items() if k != "resume"}),
        "ckpt.pt": lambda tmp: torch_save(tmp, ckpt),
        "metrics.jsonl": text_writer("".join(json.dumps(row) + "\n" for row in history)),
        "metrics.csv": text_writer(csv_text(history)),
        "config.json": text_writer(json_text(ckpt["config"])),
    }
    writes = {out / name: write for name, write in writers.items() if best or name != "best.pt"}
    kept = "the previous epoch's files are" if (out / "ckpt.pt").exists() else None
    try:
        atomic_writes(writes)
    except OSError as error:
        raise unwritten(Path(error.filename or out), error, kept) from None


def restore(run: Run, ckpt: dict, path: Path) -> list[dict]:
    """Load weights and optimizer, schedule, scaler and RNG state; return the history so far."""
    if "resume" not in ckpt:
        raise CheckpointError(f"{path} has no optimizer state (best.pt?); resume from the "
                              "run's ckpt.pt")
    if ckpt["classes"] != run.data.classes:  # else a traceback, or silently other labels
        def names(classes: list[str]) -> str:
            return f"{len(classes)}: {listing(classes, 10)}"

        raise CheckpointError(
            f"{path} was trained on other classes ({names(ckpt['classes'])}) than its data "
            f"{run.data.source} now holds ({names(run.data.classes)}); resume with the data it "
            "began with, or start a new run with another --out.")
    try:  # a damaged state fails in torch's own words, in any of these calls
        run.unwrapped.load_state_dict(ckpt["state_dict"])
        state = ckpt["resume"]
        load_optimizer(run.optimizer, state["optimizer"])
        # after the optimizer, which would set the saved LR; resumed at an epoch's end
        load_schedule(run.scheduler, state["scheduler"],
                      len(ckpt["history"]) * len(run.train_loader))
        if state["scaler"] is not None and run.scaler is not None:
            run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{path}'s saved training state does not fit its run "
                              f"({one_line(error)}); it was damaged or written by other code. "
                              f"{RESUME_FIX}") from None
    return list(ckpt["history"])

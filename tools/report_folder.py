"""A report folder made whole: every file of a report written into a temporary folder beside
--out and renamed into place at the end, replacing only an older report (tools/report.py is
its command line)."""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from common.atomic import ENCODING, write_csv, write_failed
from common.errors import ReportError, listing
from common.output_folders import made_for
from common.paths import long_name, mount_point, not_a_folder, resolved, unwritable
from common.temporaries import sweep_dead_writers, temporary_name, temporary_writer
from engine.checkpoint import broken_outputs
from engine.failures import out_of_memory_as
from tools.cams import layer_of
from tools.report_faithfulness import faithfulness, verdict
from tools.report_figures import (
    explain,
    plot_confusion,
    plot_curves,
    plot_misclassified,
    text_as_written,
    write_pdf,
)
from tools.report_inputs import (
    TrainedRun,
    load,
    most_confidently_wrong,
    normalized,
    predictions,
)
from tools.report_tables import (
    FAITHFULNESS_FIELDS,
    MISCLASSIFIED_FIELDS,
    TITLE,
    confusion,
    headline,
    misclassified_rows,
    per_class,
    summary,
)

FILES = ("summary.md", "curves.png", "misclassified.png", "misclassified.csv", "gradcam.pdf",
         "confusion.png", "per_class.csv", "faithfulness.csv")  # what write_report writes
MARKER = ".cifar10-report"  # written into every report: what says a folder is one
MARKER_TEXT = "tools/report.py wrote this folder; the next report into it replaces it whole.\n"
STAGED = "report"  # a report made inside its folder is made in .report.<pid>.tmp there


def begins_as_summary(path: Path) -> bool:
    """Whether `path` is a summary.md as report_tables.summary begins it."""
    start = f"{TITLE}\n".encode()
    try:
        with open(path, "rb") as f:
            return f.read(len(start)) == start
    except OSError:
        return False


def not_a_report(out: Path) -> str | None:
    """Why folder `out` must not be replaced, or None when it may: it is missing, empty, or
    one of the report's own, holding the report's files and nothing else, with its MARKER or
    (a report from before the marker) its summary.md. Anything else in it would go with it."""
    if not out.exists():
        return None
    if not out.is_dir():
        return not_a_folder(out)
    # a report being made inside it (built_inside) is none of its contents
    entries = [e for e in out.iterdir() if temporary_writer(e, out / STAGED) is None]
    foreign = sorted(e.name for e in entries if e.name not in (*FILES, MARKER) or not e.is_file())
    if foreign:
        return f"holds {listing(foreign)}, which no report writes"
    if entries and not (out / MARKER).is_file() and not begins_as_summary(out / "summary.md"):
        return f"has no {MARKER} and no report's summary.md"
    return None


def check_out(out: Path, given: bool) -> None:
    """Refuse to replace a folder that is not a report's (not_a_report): a report replaces its
    folder whole. `given`: whether --out named it, or it is the default."""
    problem = not_a_report(out)
    if problem is None:
        return
    what, fix = ((f"--out {out}", "choose another --out") if given else
                 (f"the default report folder {out}", "pass --out DIR to write it elsewhere"))
    raise ReportError(f"{what} is not a report folder (it {problem}), and a report replaces "
                      f"its folder whole; {fix}.")


def write_report(run: TrainedRun, folder: Path, n: int, layers: list[str],
                 methods: list[str]) -> None:
    """Every file of the report, into `folder`: the `n` most confidently wrong test images,
    explained at `layers` by `methods`."""
    probs, labels = predictions(run)
    if not np.isfinite(probs).all():
        raise broken_outputs(run.path)
    pred = probs.argmax(1)
    indices = most_confidently_wrong(probs, labels, n)
    facts = headline(run, probs, labels)
    matrix = confusion(pred, labels, len(run.classes))
    classes = per_class(matrix, run.classes)
    plot_curves(run.ckpt["history"], run.ckpt["config"]["label_smoothing"],
                folder / "curves.png")
    plot_misclassified(run, probs, indices, folder / "misclassified.png")
    write_csv(folder / "misclassified.csv", misclassified_rows(run, probs, indices),
              MISCLASSIFIED_FIELDS)
    plot_confusion(matrix, run.classes, folder / "confusion.png")
    write_csv(folder / "per_class.csv", classes)
    maps = explain(run, probs, indices, layers, methods)
    scores = faithfulness(run.model, normalized(run, indices), probs[indices].argmax(1),
                          {(m, layer): v for (m, layer, kind), v in maps.items()
                           if kind == "predicted"})
    write_csv(folder / "faithfulness.csv", scores, FAITHFULNESS_FIELDS)
    facts["most faithful explanation"] = verdict(scores)
    write_pdf(run, facts, probs, indices, maps, folder / "gradcam.pdf")
    (folder / "summary.md").write_text(
        summary(facts, classes, methods, layers, len(indices), scores), encoding=ENCODING)
    (folder / MARKER).write_text(MARKER_TEXT, encoding=ENCODING)


def publish(folder: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an older report there is removed only now."""
    old = temporary_name(out, "old")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(folder, out)
    except OSError:
        if old.exists():  # put the older report back rather than leave none
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def built_inside(out: Path) -> bool:
    """Whether the report must be made inside `out` and its files moved into place: a mount
    point (a container's volume) cannot be renamed over, nor can a folder whose parent
    cannot be written (a volume mounted in a read-only tree)."""
    return out.is_dir() and (mount_point(out) or unwritable(out.parent) is not None)


def publish_inside(folder: Path, out: Path) -> None:
    """Rename each file of the finished report in `folder` (inside `out`) over its older
    version in `out`: every file whole at every moment, the report whole once all are. The
    marker first: a report killed midway leaves a folder the next one may replace."""
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name != MARKER):
        os.replace(entry, out / entry.name)
    folder.rmdir()


def memory_advice(device: torch.device) -> AbstractContextManager[None]:
    """For the block: running out of memory becomes one line naming what to lower, the
    images explained (-n), the maps of each (--methods, --layers) or the device."""
    cpu = ", or --device cpu" if device.type != "cpu" else ""
    return out_of_memory_as(ReportError(
        f"out of memory making the report on {device.type}; try a smaller -n, or fewer "
        f"--methods or --layers{cpu}."))


def default_out(checkpoint: Path) -> Path:
    """Where a report goes without --out: report/ beside a run's ckpt.pt, report-<name>/ beside
    any other checkpoint (best.pt's: report-best/), so that one never replaces another's."""
    name = "report" if checkpoint.name == "ckpt.pt" else f"report-{checkpoint.stem}"
    return checkpoint.parent / name


def write_report_folder(checkpoint: Path, out: Path | None, data_dir: Path | None,
                        device: torch.device, n: int, layers: list[str],
                        methods: list[str]) -> Path:
    """The report of `checkpoint` written whole into `out` (None: default_out), its model run
    on `device`; returns the folder written."""
    run = load(checkpoint, data_dir, device)  # first: a missing checkpoint is what to fix
    # resolved: `--out .` has no name, and the temporary's name is made from it
    target = resolved(out or default_out(checkpoint), "--out")
    if target.is_dir():  # a report killed while it was made inside (built_inside)
        sweep_dead_writers(target / STAGED)
    check_out(target, out is not None)
    for layer in layers:
        layer_of(run.model, layer)
    with made_for(target):  # the folders above it, removed again when nothing is written
        sweep_dead_writers(target)
        inside = built_inside(target)
        if not inside and (problem := long_name(target)):  # made whole under a longer name
            raise ReportError(f"--out {target}: {problem}; choose a shorter --out.")
        folder = temporary_name(target / STAGED if inside else target)
        try:
            folder.mkdir()
            with text_as_written():  # class names and paths drawn as written, `$` and all
                write_report(run, folder, n, layers, methods)
            check_out(target, out is not None)  # again: files may have come in meanwhile
            (publish_inside if inside else publish)(folder, target)
        except OSError as error:
            raise write_failed(error, target) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return target

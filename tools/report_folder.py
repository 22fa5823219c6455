"""A report folder made whole: every file of a report written into a temporary folder beside
--out and renamed into place at the end, replacing only an older report (tools/report.py is
its command line)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from common.errors import ReportError
from common.files import temporary_name, temporary_writer, write_csv
from tools.options import pick_device
from tools.report_faithfulness import faithfulness, verdict
from tools.report_figures import explain, plot_confusion, plot_curves, plot_misclassified, write_pdf
from tools.report_inputs import (
    Inputs,
    layer_of,
    load,
    most_confidently_wrong,
    normalized,
    predictions,
)
from tools.report_tables import (
    FAITHFULNESS_FIELDS,
    MISCLASSIFIED_FIELDS,
    confusion,
    headline,
    misclassified_rows,
    per_class,
    summary,
)


def check_out(out: Path) -> None:
    """Refuse to replace anything but an older report (or an empty folder)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / "summary.md").is_file())):
        raise ReportError(f"--out {out} exists and is not a report folder; choose another "
                          "--out (a report folder is replaced whole).")


def write_report(run: Inputs, folder: Path, n: int, layers: list[str],
                 methods: list[str]) -> None:
    """Every file of the report, into `folder`: the `n` most confidently wrong test images,
    explained at `layers` by `methods`."""
    probs, labels = predictions(run)
    pred = probs.argmax(1)
    indices = most_confidently_wrong(probs, labels, n)
    facts = headline(run, probs, labels)
    matrix = confusion(pred, labels, len(run.classes))
    classes = per_class(matrix, run.classes)
    plot_curves(run.ckpt["history"], folder / "curves.png")
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
        summary(facts, classes, methods, layers, len(indices), scores))


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


def writer_alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's too: signalling it is refused, not failed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: Path) -> None:
    """Remove the `.<name>.<pid>.tmp` and `.old` folders that reports into `out` left when
    killed (SIGKILL, a power cut): of dead writers, or of this PID, reused after a restart.
    Nothing else ever removes them, and each can hold a whole report."""
    for entry in out.parent.iterdir():
        pid = temporary_writer(entry, out, ("tmp", "old"))
        if pid is not None and (pid == os.getpid() or not writer_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def write_failed(error: OSError, out: Path) -> Exception:
    """What to raise when writing the report failed: a ReportError naming --out and the fix,
    or `error` itself when it names a file elsewhere (an input)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ReportError(f"--out {out}: its disk is full, so the report could not be written "
                           "(nothing was left there); free some space or choose another --out.")
    if error.filename is None or out.parent in Path(str(error.filename)).parents:
        return ReportError(f"--out {out}: the report could not be written there "
                           f"({error.strerror or error}); choose a writable --out.")
    return error


def write_report_folder(checkpoint: Path, out: Path | None, data_dir: Path | None,
                        device: str | None, n: int, layers: list[str],
                        methods: list[str]) -> Path:
    """The report of `checkpoint` written whole into `out` (None: report/ beside it), its
    model run on `device` (None: the best one here); returns the folder written."""
    # resolved: `--out .` has no name, and the temporary's name is made from it
    out = (out or checkpoint.parent / "report").resolve()
    check_out(out)
    run = load(checkpoint, data_dir, pick_device(device))
    for layer in layers:
        layer_of(run.model, layer)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    folder = temporary_name(out)
    try:
        folder.mkdir()
        write_report(run, folder, n, layers, methods)
        publish(folder, out)
    except OSError as error:
        raise write_failed(error, out) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out

"""`python tools/report.py ckpt.pt`: turn a training run into pictures a person can read.

Writes curves.png, misclassified.png (+ .csv), gradcam.pdf, confusion.png, per_class.csv,
faithfulness.csv and summary.md into a report folder (default: report/ beside the checkpoint).
Everything is written into a temporary folder beside it and renamed into place at the end, so
a failed run never leaves a half report, and an older report is replaced only by a complete
one. The temporary folder of a report that was killed is removed by the next report into the
same folder.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, path_option, run_main

with interruptible_imports():  # torch and the rest take seconds to import
    from common.errors import ReportError
    from common.files import temporary_name, temporary_writer, write_csv
    from tools.options import (
        add_checkpoint_argument,
        add_data_dir_option,
        add_device_option,
        pick_device,
    )
    from tools.report_faithfulness import faithfulness, verdict
    from tools.report_figures import (
        METHODS,
        explain,
        plot_confusion,
        plot_curves,
        plot_misclassified,
        write_pdf,
    )
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = CommandParser(prog="python tools/report.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("--out", type=path_option("replace the current directory"),
                        default=None, metavar="DIR",
                        help="report folder, replaced when complete (default: report/ beside "
                             "the checkpoint)")
    add_data_dir_option(parser)
    parser.add_argument("-n", type=int, default=20,
                        help="misclassified images to show and explain (default: 20)")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3", "layer4"],
                        metavar="NAME",
                        help="model layers to explain (default: layer2 layer3 layer4)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["gradcam"],
                        metavar="NAME",
                        help=f"CAM methods: {', '.join(METHODS)} (default: gradcam)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be at least 1, got {args.n}")
    return args


def check_out(out: Path) -> None:
    """Refuse to replace anything but an older report (or an empty folder)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / "summary.md").is_file())):
        raise ReportError(f"--out {out} exists and is not a report folder; choose another "
                          "--out (a report folder is replaced whole).")


def write_report(run: Inputs, args: argparse.Namespace, folder: Path) -> None:
    """Every file of the report, into `folder`."""
    probs, labels = predictions(run)
    pred = probs.argmax(1)
    indices = most_confidently_wrong(probs, labels, args.n)
    facts = headline(run, probs, labels)
    matrix = confusion(pred, labels, len(run.classes))
    classes = per_class(matrix, run.classes)
    plot_curves(run.ckpt["history"], folder / "curves.png")
    plot_misclassified(run, probs, indices, folder / "misclassified.png")
    write_csv(folder / "misclassified.csv", misclassified_rows(run, probs, indices),
              MISCLASSIFIED_FIELDS)
    plot_confusion(matrix, run.classes, folder / "confusion.png")
    write_csv(folder / "per_class.csv", classes)
    maps = explain(run, probs, indices, args.layers, args.methods)
    scores = faithfulness(run.model, normalized(run, indices), probs[indices].argmax(1),
                          {(m, layer): v for (m, layer, kind), v in maps.items()
                           if kind == "predicted"})
    write_csv(folder / "faithfulness.csv", scores, FAITHFULNESS_FIELDS)
    facts["most faithful explanation"] = verdict(scores)
    write_pdf(run, facts, probs, indices, maps, folder / "gradcam.pdf")
    (folder / "summary.md").write_text(
        summary(facts, classes, args.methods, args.layers, len(indices), scores))


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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 1 with a one-paragraph error on stderr."""
    args = parse_args(argv)

    def body() -> None:
        # resolved: `--out .` has no name, and the temporary's name is made from it
        out = (args.out or args.checkpoint.parent / "report").resolve()
        check_out(out)
        run = load(args.checkpoint, args.data_dir, pick_device(args.device))
        for layer in args.layers:
            layer_of(run.model, layer)
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        folder = temporary_name(out)
        try:
            folder.mkdir()
            write_report(run, args, folder)
            publish(folder, out)
        except OSError as error:
            raise write_failed(error, out) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"wrote {out}/: summary.md, curves.png, misclassified.png, misclassified.csv, "
              "gradcam.pdf, confusion.png, per_class.csv, faithfulness.csv")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

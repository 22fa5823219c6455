"""report.py's pictures: curves, the misclassified grid, the confusion matrix, and the Grad-CAM
PDF of the trained model (a summary page, then a page of maps per image)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from common.errors import shown
from common.progress import track
from tools.cams import CAM_BATCH, CLASS_AGNOSTIC, cams, overlay
from tools.plots import Panel, plot_history
from tools.report_inputs import TrainedRun, in_chunks, normalized

log = logging.getLogger(__name__)
# matplotlib's warning for each character its fonts lack, each time a figure draws it
MISSING_GLYPH = re.compile(r"Glyph (\d+) .* missing from font\(s\) (.+)\.")


@contextmanager
def text_as_written() -> Iterator[None]:
    """For the block: text drawn as written. matplotlib reads `$...$` as math, so a class name
    or a run's path with `$` in it came out in italics, or ended the report in a parse error.
    Characters the font lacks (class names in Chinese where DejaVu Sans is the font) are drawn
    as boxes, said in one notice, not in matplotlib's warning per figure and character with its
    source line under each."""
    with matplotlib.rc_context({"text.parse_math": False}), \
            warnings.catch_warnings(record=True) as caught:
        yield
    missing: dict[str, str] = {}  # character -> the fonts that lack it
    for warning in caught:
        if match := MISSING_GLYPH.fullmatch(str(warning.message)):
            missing[chr(int(match[1]))] = match[2]
        else:  # any other warning as it would have been shown
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno, source=warning.source)
    if missing:
        log.warning(f"notice: the report's font ({', '.join(sorted(set(missing.values())))}) "
                    f"has no {''.join(sorted(missing))}, drawn as boxes in its figures; install "
                    "a font that has them and list it after that one in font.family of your "
                    "matplotlibrc (matplotlib draws each character in the first font that has "
                    "it).")

PANEL = 2.0  # inches per image panel: 32x32 pixels drawn large enough to see
NAMED_CLASSES = 100  # ours: CIFAR-100's count; the confusion matrix names up to this many


def curve_panels(label_smoothing: float) -> list[Panel]:
    """Loss, accuracy and LR per epoch. The train loss is the one trained on: label smoothing
    keeps it above a floor of its own (about 0.87 at 0.2 over 10 classes) where the test loss
    can fall towards 0; the title says so, lest it read as a model fitting its test set better."""
    smoothed = f"; train's with label smoothing {label_smoothing:g}" if label_smoothing else ""
    return [Panel(f"loss (log scale{smoothed})", ("train_loss", "test_loss"), yscale="log"),
            Panel("accuracy (%)", ("train_acc", "test_acc"), scale=100),
            Panel("learning rate (end of epoch)", ("lr",))]


def plot_curves(history: list[dict], label_smoothing: float, path: Path) -> None:
    """Train/test loss and accuracy and the LR per epoch, from the checkpoint's history."""
    plot_history({"run": history}, curve_panels(label_smoothing)).savefig(path, dpi=90)


def plot_misclassified(run: TrainedRun, probs: np.ndarray, indices: np.ndarray, path: Path) -> None:
    """A grid of the most confidently wrong test images, in true colour, with both classes."""
    cols = min(5, max(1, len(indices)))
    rows = max(1, -(-len(indices) // cols))
    fig = Figure(figsize=(cols * PANEL, rows * (PANEL + 0.5)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, indices, strict=False):
        ax.imshow(run.images[i], interpolation="nearest")
        ax.set_title(f"#{i}  true: {run.classes[run.labels[i]]}\n"
                     f"predicted: {run.classes[probs[i].argmax()]} {probs[i].max():.0%}",
                     fontsize=10)
    if not len(indices):
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("Most confidently wrong test predictions", fontsize=13)
    fig.savefig(path, dpi=80)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """The confusion matrix as counts and row-normalized (each true class sums to 1). Past
    NAMED_CLASSES classes its axes count them instead, at that many classes' size: 1000 named
    made a figure of 72,000 x 36,000 pixels, and the OOM killer ended the report."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    named = len(classes) <= NAMED_CLASSES
    size = max(6.0, 0.45 * min(len(classes), NAMED_CLASSES) + 2)
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    for ax, values, title, fmt in zip(fig.subplots(1, 2), (matrix, rates),
                                      ("counts", "row-normalized (recall on the diagonal)"),
                                      ("{:d}", "{:.2f}"), strict=True):
        image = ax.imshow(values, cmap="Blues")
        fig.colorbar(image, ax=ax, shrink=0.8)
        which = "" if named else " (its index in per_class.csv)"
        ax.set(title=title, xlabel=f"predicted class{which}", ylabel=f"true class{which}")
        if named:
            ticks = np.arange(len(classes))
            ax.set_xticks(ticks, classes, rotation=90, fontsize=8 if len(classes) > 20 else 10)
            ax.set_yticks(ticks, classes, fontsize=8 if len(classes) > 20 else 10)
        if len(classes) <= 20:  # more numbers than that would be unreadable
            for (t, p), v in np.ndenumerate(values):
                ax.text(p, t, fmt.format(v.item()), ha="center", va="center", fontsize=8,
                        color="white" if v > values.max() / 2 else "black")
    fig.savefig(path, dpi=80)


def summary_page(facts: dict[str, str], config: dict) -> Figure:
    """The PDF's first page: headline figures and the run's whole config."""
    fig = Figure(figsize=(11, 8.5))
    fig.text(0.05, 0.94, "Training run summary", fontsize=20, weight="bold")
    y = 0.88
    for key, value in facts.items():
        fig.text(0.05, y, f"{key}:", fontsize=11, weight="bold")
        # wrapping measures text holding two `$` as math, parse_math or not (matplotlib 3.11):
        # escaped, the `$` are measured and drawn as written
        fig.text(0.27, y, value.replace("$", r"\$"), fontsize=11, wrap=True, parse_math=True)
        y -= 0.04
    fig.text(0.05, y - 0.02, "config", fontsize=13, weight="bold")
    items = [f"{k} = {shown(str(v))}" for k, v in config.items()]  # paths among them
    half = -(-len(items) // 2)
    for column, part in enumerate((items[:half], items[half:])):
        fig.text(0.05 + 0.47 * column, y - 0.05, "\n".join(part), fontsize=9, va="top",
                 family="monospace", linespacing=1.5)
    return fig


def cam_page_frame(rows: int) -> tuple[Figure, np.ndarray, Axes]:
    """A CAM page's figure, its rows x 5 image axes and its colorbar's axes, placed in inches
    for the labels cam_page draws. Not a constrained layout: every page has the same frame,
    and solving it again for each page took half of write_pdf's time
    (benchmarks/results/report-cam-pages-cpu-2core.log)."""
    width, height = 5 * PANEL + 1, rows * PANEL + 1.2
    left, right, top, bottom = 0.6, 1.0, 0.85, 0.1  # row labels; colorbar; titles; an edge
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, 5, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - right / width, top=1 - top / height,
        bottom=bottom / height, wspace=0.04, hspace=0.04))
    span = min(0.6 * rows, 2) * PANEL  # the colorbar's height, centred on the rows
    colorbar_axes = fig.add_axes(((width - right + 0.15) / width,
                                  (bottom + (height - top - bottom - span) / 2) / height,
                                  0.15 / width, span / height))
    return fig, axes, colorbar_axes


def cam_page(run: TrainedRun, index: int, probs: np.ndarray,
             maps: dict[tuple[str, str, str], np.ndarray]) -> Figure:
    """One image's page: a row per (method, layer); heat map and overlay per target class."""
    image, true, pred = run.images[index], int(run.labels[index]), int(probs.argmax())
    rows = list(dict.fromkeys((method, layer) for method, layer, _ in maps))
    fig, axes, colorbar_axes = cam_page_frame(len(rows))
    for r, (method, layer) in enumerate(rows):
        axes[r, 0].imshow(image, interpolation="nearest")
        # a class-agnostic map is the same under both titles: said, or it reads as evidence
        agnostic = ": any class" if method in CLASS_AGNOSTIC else ""
        axes[r, 0].set_ylabel(f"{method}{agnostic}\n{layer}", fontsize=12)
        for k, (kind, cls) in enumerate((("predicted", pred), ("true", true))):
            cam = maps[method, layer, kind]
            heat = axes[r, 1 + 2 * k].imshow(cam, cmap="jet", vmin=0, vmax=1,
                                             interpolation="nearest")
            axes[r, 2 + 2 * k].imshow(overlay(image, cam), interpolation="nearest")
            if not cam.any():  # all-zero after the ReLU: say so, or it looks like a bug
                axes[r, 1 + 2 * k].text(16, 16, "no positive\nevidence", ha="center",
                                        va="center", color="white", fontsize=10)
            if r == 0:
                name = f"{kind}: {run.classes[cls]}"
                axes[r, 1 + 2 * k].set_title(f"{name}\nheat map", fontsize=11)
                axes[r, 2 + 2 * k].set_title(f"{name}\noverlay", fontsize=11)
    axes[0, 0].set_title("test image", fontsize=11)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(heat, cax=colorbar_axes, label="CAM (1 = strongest evidence)")
    fig.suptitle(f"test image #{index}: true {run.classes[true]}, predicted "
                 f"{run.classes[pred]} with probability {probs[pred]:.1%}", fontsize=13)
    return fig


def explain(run: TrainedRun, probs: np.ndarray, indices: np.ndarray, layers: list[str],
            methods: list[str], chunk: int = CAM_BATCH) -> dict[tuple[str, str, str], np.ndarray]:
    """CAMs of the images at `indices` for their predicted and their true class:
    {(method, layer, "predicted" or "true"): N x 32 x 32}, made `chunk` images at a time;
    EigenCAM's, which no class changes, is made once and given for both."""
    inputs = normalized(run, indices)
    targets = {"predicted": probs[indices].argmax(1), "true": run.labels[indices]}
    jobs = [(m, layer, kind) for m in methods for layer in layers
            for kind in (["predicted"] if m in CLASS_AGNOSTIC else targets)]

    def maps_of(method: str, layer: str, kind: str) -> np.ndarray:
        return in_chunks(lambda part: cams(run.model, inputs[part], targets[kind][part], layer,
                                           method), len(indices), chunk)

    maps = {job: maps_of(*job)
            for job in track(jobs if len(indices) else [], desc="CAMs", unit="map")}
    # a class-agnostic method's one map serves both targets
    return maps | {(m, layer, "true"): maps[m, layer, "predicted"]
                   for m, layer, _ in maps if m in CLASS_AGNOSTIC}


def write_pdf(run: TrainedRun, facts: dict[str, str], probs: np.ndarray, indices: np.ndarray,
              maps: dict[tuple[str, str, str], np.ndarray], path: Path) -> None:
    """gradcam.pdf: the run summary, then one page of CAMs per misclassified image."""
    with PdfPages(path) as pdf:
        pdf.savefig(summary_page(facts, run.ckpt["config"]))
        for row, index in enumerate(track(indices, desc="PDF pages", unit="page")):
            page = {key: values[row] for key, values in maps.items()}
            pdf.savefig(cam_page(run, int(index), probs[index], page))


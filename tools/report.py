"""`python tools/report.py ckpt.pt`: turn a training run into pictures a person can read.

Writes curves.png, misclassified.png (+ .csv), gradcam.pdf, confusion.png, per_class.csv and
summary.md into a report folder (default: report/ beside the checkpoint). Everything is written
into a temporary folder beside it and renamed into place at the end, so a failed run never
leaves a half report, and an older report is replaced only by a complete one.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm import tqdm

from engine import checkpoint
from engine.checkpoint import CheckpointError
from engine.evaluate import predict as predict_probs
from loaders import beton, make_loader
from loaders.augment import Augment
from loaders.cifar import DataError
from loaders.prepare import prepare

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM,
           "eigencam": EigenCAM, "layercam": LayerCAM}
BATCH = 500  # test images per forward pass of the evaluation
PANEL = 2.0  # inches per image panel: 32x32 pixels drawn large enough to see


class ReportError(Exception):
    """The report cannot be made from these inputs; the message says what to change."""


@dataclass
class Run:
    """A loaded checkpoint, its model on the device and its test split, checked to fit."""

    path: Path
    ckpt: dict
    model: nn.Module  # fp32, eager, unwrapped, eval mode
    test: Path  # the test .beton
    images: np.ndarray  # uint8 N x 32 x 32 x 3 (HWC, RGB), in test order
    labels: np.ndarray
    device: torch.device

    @property
    def classes(self) -> list[str]:
        """Class names, indexed by label."""
        return list(self.ckpt["classes"])


# --- inputs ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python tools/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="ckpt.pt (or best.pt) of a training run")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder, replaced when complete (default: report/ beside "
                             "the checkpoint)")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="rebuild the test split in DIR instead of reading the .beton path "
                             "recorded in the checkpoint")
    parser.add_argument("-n", type=int, default=20,
                        help="misclassified images to show and explain (default: 20)")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3", "layer4"],
                        metavar="NAME",
                        help="model layers to explain (default: layer2 layer3 layer4)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["gradcam"],
                        metavar="NAME",
                        help=f"CAM methods: {', '.join(METHODS)} (default: gradcam)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the model runs (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be at least 1, got {args.n}")
    return args


def pick_device(name: str | None) -> torch.device:
    """The device asked for, or the best one here; refuse CUDA where there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ReportError("--device cuda: no CUDA GPU is available here; use --device cpu.")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def locate_test_data(ckpt: dict, path: Path, data_dir: Path | None) -> Path:
    """The test .beton: the one recorded in the checkpoint, or rebuilt from --data-dir."""
    data = ckpt["data"] if isinstance(ckpt["data"], dict) else {}
    dataset = data.get("dataset", "?")
    if data_dir is None:
        recorded = Path(data.get("test", ""))
        if not recorded.is_file():
            raise ReportError(f"{path} records its test data at {recorded}, which does not "
                              f"exist (moved or deleted?). Pass --data-dir DIR to rebuild the "
                              f"{dataset} test split there.")
        return recorded
    if not data_dir.is_dir():
        raise ReportError(f"--data-dir {data_dir} does not exist. Pass the folder the run was "
                          f"trained from (it holds the {dataset} data or its .beton files), or "
                          f"leave --data-dir out to use {data.get('test', '?')}.")
    size = tuple(ckpt["config"].get("synthetic_size", (50_000, 10_000)))
    return prepare(dataset, data_dir, synthetic_size=size).test


def load(path: Path, data_dir: Path | None, device: torch.device) -> Run:
    """Checkpoint, model and test split; ReportError (or Checkpoint/DataError) if they misfit."""
    ckpt = checkpoint.load(path)
    if not ckpt["history"]:
        raise ReportError(f"{path} holds no finished epoch; train at least one epoch first.")
    model = checkpoint.model_from(ckpt, path).to(device)
    test = locate_test_data(ckpt, path, data_dir)
    split = beton.read(test)
    info = beton.read_info(test)
    if (info is not None and info.classes != ckpt["classes"]) or (
            len(split.labels) and split.labels.max() >= ckpt["num_classes"]):
        raise ReportError(f"{test} holds another dataset than the one {path} was trained on "
                          f"({ckpt['num_classes']} classes: {', '.join(ckpt['classes'][:4])}, "
                          "...); pass the right --data-dir.")
    return Run(path, ckpt, model, test, split.images, split.labels, device)


def layer_of(model: nn.Module, name: str) -> nn.Module:
    """A submodule by its name (layer3, layer3.1, ...); ReportError naming the valid ones."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        names = ", ".join(modules_with_maps(model))
        raise ReportError(f"--layers {name}: the model has no such layer; choose from {names}.")
    return modules[name]


def modules_with_maps(model: nn.Module) -> list[str]:
    """Top-level layers whose output is a spatial feature map, the ones CAMs can explain."""
    return [name for name, m in model.named_children()
            if any(isinstance(c, nn.Conv2d) for c in m.modules())]


# --- predictions ---------------------------------------------------------------------------


def predict(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N x C) and labels of the test split: fp32, eager, no TTA."""
    loader = make_loader("resident", run.test, train=False, batch_size=BATCH, device=run.device,
                         mean=run.ckpt["mean"], std=run.ckpt["std"])
    probs, labels = predict_probs(run.model, loader, tta=False)
    return probs.numpy(), labels.numpy()


def most_confidently_wrong(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n wrong predictions made with the highest probability, highest first."""
    pred, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:n]


def normalized(run: Run, indices: np.ndarray) -> torch.Tensor:
    """The model's input for these test images: training's normalization, no augmentation."""
    augment = Augment(None, run.ckpt["mean"], run.ckpt["std"], torch.float32, run.device)
    return augment(torch.from_numpy(run.images[indices]).to(run.device))


def cams(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray, layer: str,
         method: str = "gradcam") -> np.ndarray:
    """Class activation maps of `layer` for each input's target class: N x H x W in [0, 1]."""
    with METHODS[method](model=model, target_layers=[layer_of(model, layer)]) as cam:
        return cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])


# --- tables --------------------------------------------------------------------------------


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts C x C: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def per_class(matrix: np.ndarray, classes: list[str]) -> list[dict]:
    """Support, precision, recall, accuracy (= recall: share of the class's images right), F1."""
    rows = []
    for c, name in enumerate(classes):
        support, predicted, correct = matrix[c].sum(), matrix[:, c].sum(), matrix[c, c]
        precision = correct / predicted if predicted else 0.0
        recall = correct / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(dict(index=c, name=name, support=int(support), predicted=int(predicted),
                         correct=int(correct), precision=round(float(precision), 4),
                         recall=round(float(recall), 4), accuracy=round(float(recall), 4),
                         f1=round(float(f1), 4)))
    return rows


def misclassified_rows(run: Run, probs: np.ndarray, indices: np.ndarray) -> list[dict]:
    """One row per shown image: test index, true and predicted class, both probabilities."""
    return [dict(rank=rank + 1, index=int(i), true=run.classes[run.labels[i]],
                 predicted=run.classes[probs[i].argmax()],
                 probability=round(float(probs[i].max()), 4),
                 true_probability=round(float(probs[i, run.labels[i]]), 4))
            for rank, i in enumerate(indices)]


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows as CSV with a header, columns in the order of the first row's keys."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)


def headline(run: Run, probs: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """The run's key figures, shared by the PDF's first page and summary.md."""
    ckpt, history = run.ckpt, run.ckpt["history"]
    last, best = history[-1], max(history, key=lambda r: r["test_acc"])
    seconds = sum(r.get("seconds", 0.0) for r in history)
    tta = " with flip TTA" if ckpt["config"].get("tta") else ""
    params = sum(p.numel() for p in run.model.parameters())
    wrong = int((probs.argmax(1) != labels).sum())
    return {
        "checkpoint": str(run.path),
        "dataset": f"{ckpt['data'].get('dataset', '?')}: {len(labels):,} test images, "
                   f"{ckpt['num_classes']} classes ({run.test})",
        "model": f"{ckpt['arch']}, width {ckpt['width']}, {params:,} parameters",
        "epochs": f"{len(history)} of {ckpt['config'].get('epochs', '?')}",
        "final test accuracy": f"{last['test_acc']:.2%} at epoch {last['epoch']}{tta} "
                               f"(test loss {last['test_loss']:.4f})",
        "best test accuracy": f"{best['test_acc']:.2%} at epoch {best['epoch']}{tta}",
        "this report's accuracy": f"{1 - wrong / len(labels):.2%} ({wrong:,} wrong; fp32, "
                                  f"no TTA, on {run.device.type})",
        "trained on": f"{ckpt.get('device', '?')} x {ckpt.get('processes', 1)} process(es), "
                      f"torch {ckpt.get('torch', '?')}",
        "training time": f"{seconds:,.1f} s ({seconds / 60:.1f} min) over {len(history)} "
                         f"epochs, {history[-1].get('images_per_s', 0):,.0f} images/s last",
    }


# --- pictures ------------------------------------------------------------------------------


def plot_curves(history: list[dict], path: Path) -> None:
    """Train/test loss and accuracy and the LR per epoch, from the checkpoint's history."""
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss, acc, lr = fig.subplots(1, 3)
    for split, style in (("train", "o-"), ("test", "s-")):
        loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split)
        acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], style, label=split)
    lr.plot(epochs, [r["lr"] for r in history], "o-", color="tab:green")
    titles = ("loss (log scale)", "accuracy (%)", "learning rate (end of epoch)")
    for ax, title in zip((loss, acc, lr), titles, strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss.set_yscale("log")
    loss.legend()
    acc.legend()
    fig.savefig(path, dpi=90)


def plot_misclassified(run: Run, probs: np.ndarray, indices: np.ndarray, path: Path) -> None:
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
    """The confusion matrix as counts and row-normalized (each true class sums to 1)."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(6.0, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    for ax, values, title, fmt in zip(fig.subplots(1, 2), (matrix, rates),
                                      ("counts", "row-normalized (recall on the diagonal)"),
                                      ("{:d}", "{:.2f}"), strict=True):
        image = ax.imshow(values, cmap="Blues")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=title, xlabel="predicted class", ylabel="true class")
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
        fig.text(0.27, y, value, fontsize=11, wrap=True)
        y -= 0.04
    fig.text(0.05, y - 0.02, "config", fontsize=13, weight="bold")
    items = [f"{k} = {v}" for k, v in config.items()]
    half = -(-len(items) // 2)
    for column, part in enumerate((items[:half], items[half:])):
        fig.text(0.05 + 0.47 * column, y - 0.05, "\n".join(part), fontsize=9, va="top",
                 family="monospace", linespacing=1.5)
    return fig


def cam_page(run: Run, index: int, probs: np.ndarray,
             maps: dict[tuple[str, str, str], np.ndarray]) -> Figure:
    """One image's page: a row per (method, layer); heat map and overlay per target class."""
    image, true, pred = run.images[index], int(run.labels[index]), int(probs.argmax())
    rows = list(dict.fromkeys((method, layer) for method, layer, _ in maps))
    fig = Figure(figsize=(5 * PANEL + 1, len(rows) * PANEL + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), 5, squeeze=False)
    for r, (method, layer) in enumerate(rows):
        axes[r, 0].imshow(image, interpolation="nearest")
        axes[r, 0].set_ylabel(f"{method}\n{layer}", fontsize=12)
        for k, (kind, cls) in enumerate((("predicted", pred), ("true", true))):
            cam = maps[method, layer, kind]
            heat = axes[r, 1 + 2 * k].imshow(cam, cmap="jet", vmin=0, vmax=1,
                                             interpolation="nearest")
            overlay = show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True,
                                        image_weight=0.5)
            axes[r, 2 + 2 * k].imshow(overlay, interpolation="nearest")
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
    fig.colorbar(heat, ax=axes, shrink=min(0.6, 2 / len(rows)),
                 label="CAM (1 = strongest evidence)")
    fig.suptitle(f"test image #{index}: true {run.classes[true]}, predicted "
                 f"{run.classes[pred]} with probability {probs[pred]:.1%}", fontsize=13)
    return fig


def write_pdf(run: Run, facts: dict[str, str], probs: np.ndarray, indices: np.ndarray,
              layers: list[str], methods: list[str], path: Path) -> None:
    """gradcam.pdf: the run summary, then one page of CAMs per misclassified image."""
    inputs = normalized(run, indices)
    targets = {"predicted": probs[indices].argmax(1), "true": run.labels[indices]}
    jobs = [(m, layer, kind) for m in methods for layer in layers for kind in targets]
    maps = {(m, layer, kind): cams(run.model, inputs, targets[kind], layer, m)
            for m, layer, kind in tqdm(jobs if len(indices) else [], desc="CAMs", leave=False)}
    with PdfPages(path) as pdf:
        pdf.savefig(summary_page(facts, run.ckpt["config"]))
        for row, index in enumerate(tqdm(indices, desc="PDF pages", leave=False)):
            page = {key: values[row] for key, values in maps.items()}
            pdf.savefig(cam_page(run, int(index), probs[index], page))


def summary(facts: dict[str, str], classes: list[dict], methods: list[str],
            layers: list[str], shown: int) -> str:
    """summary.md: the headline figures, the hardest classes, and links to every file."""
    lines = ["# Training report", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    hardest = sorted(classes, key=lambda r: r["recall"])[:5]
    lines += ["", "## Hardest classes", "",
              "Per-class accuracy is the share of a class's test images classified correctly, "
              "which is the same number as its recall.", "",
              "| class | support | precision | recall (= accuracy) | F1 |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['support']} | {r['precision']:.2%} | {r['recall']:.2%} | "
              f"{r['f1']:.2%} |" for r in hardest]
    lines += ["", "## Files", "",
              "- [curves.png](curves.png): train and test loss and accuracy, and the LR, "
              "per epoch", "",
              "  ![curves](curves.png)", "",
              f"- [misclassified.png](misclassified.png): the {shown} most confidently wrong "
              "test images ([misclassified.csv](misclassified.csv): their test indices and "
              "probabilities)", "",
              "  ![misclassified](misclassified.png)", "",
              f"- [gradcam.pdf](gradcam.pdf): a run summary page, then one page per image above "
              f"with {', '.join(methods)} maps of {', '.join(layers)} for the predicted and the "
              "true class", "",
              "- [confusion.png](confusion.png): the confusion matrix, counts and row-normalized",
              "", "  ![confusion](confusion.png)", "",
              "- [per_class.csv](per_class.csv): support, precision, recall, accuracy (= recall) "
              "and F1 of every class", ""]
    return "\n".join(lines)


# --- the report folder ---------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Refuse to replace anything but an older report (or an empty folder)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / "summary.md").is_file())):
        raise ReportError(f"--out {out} exists and is not a report folder; choose another "
                          "--out (a report folder is replaced whole).")


def write_report(run: Run, args: argparse.Namespace, folder: Path) -> None:
    """Every file of the report, into `folder`."""
    probs, labels = predict(run)
    pred = probs.argmax(1)
    indices = most_confidently_wrong(probs, labels, args.n)
    facts = headline(run, probs, labels)
    matrix = confusion(pred, labels, len(run.classes))
    classes = per_class(matrix, run.classes)
    plot_curves(run.ckpt["history"], folder / "curves.png")
    plot_misclassified(run, probs, indices, folder / "misclassified.png")
    write_csv(folder / "misclassified.csv", misclassified_rows(run, probs, indices))
    plot_confusion(matrix, run.classes, folder / "confusion.png")
    write_csv(folder / "per_class.csv", classes)
    write_pdf(run, facts, probs, indices, args.layers, args.methods, folder / "gradcam.pdf")
    (folder / "summary.md").write_text(
        summary(facts, classes, args.methods, args.layers, len(indices)))


def publish(folder: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an older report there is removed only now."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 1 with a one-paragraph error on stderr."""
    args = parse_args(argv)
    out = args.out or args.checkpoint.parent / "report"
    try:
        check_out(out)
        run = load(args.checkpoint, args.data_dir, pick_device(args.device))
        for layer in args.layers:
            layer_of(run.model, layer)
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            write_report(run, args, folder)
            publish(folder, out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except (CheckpointError, DataError, ReportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}/: summary.md, curves.png, misclassified.png, gradcam.pdf, "
          "confusion.png, per_class.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

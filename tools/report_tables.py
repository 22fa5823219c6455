"""report.py's numbers: confusion matrix, per-class metrics, the misclassified list, the
headline figures and summary.md."""

from __future__ import annotations

import numpy as np

from common.errors import shown
from common.wording import counted
from engine.history import best_epoch, time_spent
from tools.cams import CLASS_AGNOSTIC
from tools.report_inputs import TrainedRun

FAITHFULNESS_FIELDS = ("method", "layer", "road", "road_std", "images")
MISCLASSIFIED_FIELDS = ("rank", "index", "true", "predicted", "probability", "true_probability")
TITLE = "# Training report"  # summary.md's first line: tools/report_folder.py knows a report by it


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


def misclassified_rows(run: TrainedRun, probs: np.ndarray, indices: np.ndarray) -> list[dict]:
    """One row per shown image: test index, true and predicted class, both probabilities."""
    return [dict(rank=rank + 1, index=int(i), true=run.classes[run.labels[i]],
                 predicted=run.classes[probs[i].argmax()],
                 probability=round(float(probs[i].max()), 4),
                 true_probability=round(float(probs[i, run.labels[i]]), 4))
            for rank, i in enumerate(indices)]


def headline(run: TrainedRun, probs: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """The run's key figures, shared by the PDF's first page and summary.md."""
    ckpt, history = run.ckpt, run.ckpt["history"]
    last, best = history[-1], best_epoch(history)
    seconds = time_spent(history)
    tta = " with flip TTA" if ckpt["config"]["tta"] else ""
    params = sum(p.numel() for p in run.model.parameters())
    wrong = int((probs.argmax(1) != labels).sum())
    processes, epochs = ckpt.get("processes", 1), len(history)
    return {
        "checkpoint": shown(str(run.path)),
        "dataset": f"{ckpt['data']['dataset']}: {len(labels):,} test images, "
                   f"{ckpt['num_classes']} classes ({shown(str(run.test))})",
        "model": f"{ckpt['arch']}, width {ckpt['width']}, {params:,} parameters",
        "epochs": f"{len(history)} of {ckpt['config']['epochs']}",
        "final test accuracy": f"{last['test_acc']:.2%} at epoch {last['epoch']}{tta} "
                               f"(test loss {last['test_loss']:.4f})",
        "best test accuracy": f"{best['test_acc']:.2%} at epoch {best['epoch']}{tta}",
        "this report's accuracy": f"{1 - wrong / len(labels):.2%} ({wrong:,} wrong; fp32, "
                                  f"no TTA, on {run.device.type})",
        "trained on": f"{ckpt.get('device', '?')} x {counted(processes, 'process', 'processes')}, "
                      f"torch {ckpt.get('torch', '?')}",
        "training time": f"{seconds:,.1f} s ({seconds / 60:.1f} min) over "
                         f"{counted(epochs, 'epoch')}, "
                         f"{history[-1].get('images_per_s', 0):,.0f} images/s last",
    }


def cell(text: object) -> str:
    """text for a Markdown table cell: a '|' (possible in an image folder's class names) would
    end the cell, and a line break the table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def any_class(methods: list[str]) -> str:
    """What the PDF's pages say of the class-agnostic methods among `methods`: one map each."""
    agnostic = [m for m in methods if m in CLASS_AGNOSTIC]
    return f" ({', '.join(agnostic)}: one map, for any class)" if agnostic else ""


def summary(facts: dict[str, str], classes: list[dict], methods: list[str],
            layers: list[str], images_shown: int, scores: list[dict]) -> str:
    """summary.md: the headline figures, the hardest classes, how faithful each explanation
    is, and links to every file."""
    lines = [TITLE, "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {cell(value)} |" for key, value in facts.items()]
    hardest = sorted(classes, key=lambda r: r["recall"])[:5]
    lines += ["", "## Hardest classes", "",
              "Per-class accuracy is the share of a class's test images classified correctly, "
              "which is the same number as its recall. It, the confusion matrix and the "
              "misclassified images come from this report's evaluation (fp32, no TTA), as "
              "the maps explain one forward pass; the training run's accuracies above are "
              "its own.", "",
              "| class | support | precision | recall (= accuracy) | F1 |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {cell(r['name'])} | {r['support']} | {r['precision']:.2%} | {r['recall']:.2%} | "
              f"{r['f1']:.2%} |" for r in hardest]
    lines += ["", "## Which explanation to trust", "",
              "ROAD score of each map for the predicted class of the images above (Rong et al. "
              "2022, with pytorch-grad-cam's ROADCombined at 20/40/60/80% of pixels removed, "
              "tied pixels in a fixed random order): "
              "the confidence drop when the most relevant pixels are removed minus the drop "
              "when the least relevant are, halved. Higher is more faithful; random maps are "
              "the floor.", "",
              "| method | layer | ROAD | std | images |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['layer']} | {r['road']:+.4f} | {r['road_std']:.4f} | "
              f"{r['images']} |" for r in scores]
    lines += ["", "## Files", "",
              "- [curves.png](curves.png): train and test loss and accuracy, and the LR, "
              "per epoch", "",
              "  ![curves](curves.png)", "",
              f"- [misclassified.png](misclassified.png): the {images_shown} most confidently "
              "wrong test images ([misclassified.csv](misclassified.csv): their test indices "
              "and probabilities)", "",
              "  ![misclassified](misclassified.png)", "",
              f"- [gradcam.pdf](gradcam.pdf): a run summary page, then one page per image above "
              f"with {', '.join(methods)} maps of {', '.join(layers)} for the predicted and the "
              f"true class{any_class(methods)}", "",
              "- [confusion.png](confusion.png): the confusion matrix, counts and row-normalized",
              "", "  ![confusion](confusion.png)", "",
              "- [per_class.csv](per_class.csv): every class's index, name, support, predicted "
              "and correct counts, precision, recall, accuracy (= recall) and F1", "",
              "- [faithfulness.csv](faithfulness.csv): the ROAD table above", ""]
    return "\n".join(lines)


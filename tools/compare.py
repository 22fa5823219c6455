"""`python tools/compare.py --optimizers sgd adamw ... [training options]`: optimizers side by side.

Trains one run per optimizer with engine/train.py's own training loop, from the same seed, data
and options, each at its own LR: the table below, `--lr auto` (the range test's suggestion for
each optimizer) or one `--lr X` for all. Each run keeps its directory in --out/<optimizer>/;
compare.png overlays train loss, test accuracy and LR per epoch, and compare.csv and compare.md
give each optimizer's LR, final and best test accuracy and seconds per epoch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from engine import lr_range
from engine.config import TrainConfig, parse_tool_args
from engine.optim import OPTIMIZERS
from engine.train import TrainingError, train
from loaders.cifar import DataError
from loaders.files import atomic_write

# Peak LRs when --lr is left out:
# - sgd, nesterov: 0.1 per 256 images, ResNet's 0.1 at batch 256 (He et al., 2016) with the
#   linear scaling rule (Goyal et al., 2017), as the fast preset's 0.2 at batch 512.
# - adam, adamw: 1e-3, the default of Kingma & Ba (2015), Loshchilov & Hutter (2019) and torch.
# - rmsprop: 1e-3, Hinton's lecture 6e and Keras' default (torch's 1e-2 assumes no momentum,
#   and engine.optim gives RMSprop the run's momentum).
BASE_LRS = {"sgd": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
SCALED = {"sgd", "nesterov"}  # scaled linearly with batch size / 256
FIELDS = ("optimizer", "lr", "final_test_acc", "best_test_acc", "seconds_per_epoch", "epochs",
          "note")


@dataclass
class Result:
    """One optimizer's run: the LR it trained at, its per-epoch history, and why it stopped."""

    optimizer: str
    lr: float | str
    history: list[dict]
    note: str = ""  # empty when the run finished

    def row(self) -> dict:
        """The run in one table row."""
        accs = [r["test_acc"] for r in self.history]
        seconds = [r["seconds"] for r in self.history]
        return dict(optimizer=self.optimizer, lr=self.lr,
                    final_test_acc=accs[-1] if accs else None,
                    best_test_acc=max(accs) if accs else None,
                    seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None,
                    epochs=len(self.history), note=self.note)


def lr_text(lr: float | str) -> str:
    """An LR for a label: 3 digits, or 'auto' where the range test never ran."""
    return f"{lr:.3g}" if isinstance(lr, float) else lr


def default_lr(optimizer: str, batch_size: int) -> float:
    """The optimizer's peak LR from BASE_LRS, scaled to the batch size for SGD."""
    return BASE_LRS[optimizer] * (batch_size / 256 if optimizer in SCALED else 1.0)


def lr_source(lr: float | str | None) -> str:
    """Where the runs' LRs came from, for the table's caption."""
    if lr is None:
        return "each optimizer's default (BASE_LRS in tools/compare.py)"
    if lr == "auto":
        return "each optimizer's LR range test suggestion (--lr auto)"
    return f"--lr {lr:g} for all"


def own_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("comparison")
    g.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                   metavar="NAME",
                   help=f"optimizers to train, each once: {', '.join(OPTIMIZERS)} (default: "
                        "all). Without --lr each takes its own LR (BASE_LRS in this file)")
    return p


def check(args: argparse.Namespace) -> None:
    """Each optimizer once: every run has its own directory."""
    if len(set(args.optimizers)) < len(args.optimizers):
        raise ValueError(f"--optimizers names one twice: {' '.join(args.optimizers)}")


def train_one(base: TrainConfig, optimizer: str, lr: float | str, out: Path) -> Result:
    """Train one optimizer through engine.train.train; a diverged run is kept as a result."""
    cfg = replace(base, optimizer=optimizer, lr=lr, out=str(out))
    torch.compiler.reset()  # the previous run's compiled graphs must not be reused or count
    note = ""
    try:
        if train(cfg, None) == 130:  # train() turns Ctrl-C into 130: stop the comparison too
            raise KeyboardInterrupt
    except (TrainingError, lr_range.RangeTestError) as error:  # a result, not the end
        note = str(error)
        print(f"error: {optimizer}: {error}", file=sys.stderr)
    metrics = out / "metrics.jsonl"
    history = ([json.loads(line) for line in metrics.read_text().splitlines()]
               if metrics.exists() else [])
    return Result(optimizer, cfg.lr, history, note)  # cfg.lr: the range test's, with --lr auto


def plot(results: list[Result], path: Path) -> None:
    """Train loss, test accuracy and LR per epoch, one line per optimizer."""
    fig = Figure(figsize=(14, 4), layout="constrained")
    panels = fig.subplots(1, 3)
    for ax, key, label in zip(panels, ("train_loss", "test_acc", "lr"),
                              ("train loss", "test accuracy", "LR at the end of the epoch"),
                              strict=True):
        for result in results:
            ax.plot([r["epoch"] for r in result.history], [r[key] for r in result.history],
                    marker="o", label=f"{result.optimizer} (lr {lr_text(result.lr)})")
        ax.set(xlabel="epoch", title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    # LRs of different optimizers lie decades apart, and a schedule may end at 0: log scale
    # down to the smallest LR recorded, linear below it
    lrs = [r["lr"] for result in results for r in result.history if r["lr"] > 0]
    if lrs:
        panels[2].set_yscale("symlog", linthresh=min(lrs))
    panels[2].set_ylim(bottom=0)
    panels[0].legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def markdown(rows: list[dict], cfg: TrainConfig, source: str) -> str:
    """The table for a README or a pull request, with what every run shared."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    lines = [f"{cfg.epochs} epochs of {cfg.dataset}, batch {cfg.batch_size}, width {cfg.width}, "
             f"{cfg.schedule} schedule, seed {cfg.seed}; LR: {source}.", "",
             "| optimizer | lr | final test acc | best test acc | s/epoch | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['optimizer']} | {lr_text(r['lr'])} | {pct(r['final_test_acc'])} | "
              f"{pct(r['best_test_acc'])} | "
              + ("-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}")
              + f" | {r['note'].split(';')[0]} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], cfg: TrainConfig, source: str, out: Path) -> None:
    """compare.png, compare.csv and compare.md into out; the table on stdout too."""
    rows = [r.row() for r in results]
    table = markdown(rows, cfg, source)
    plot(results, out / "compare.png")
    write_csv(rows, out / "compare.csv")
    atomic_write(out / "compare.md", lambda tmp: tmp.write_text(table))
    print(table, end="")
    print(f"wrote {out}/compare.png, compare.csv, compare.md")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_tool_args(argv, "tools/compare.py", __doc__.splitlines()[0],
                                own_options(), check)
    out = Path(cfg.out)
    taken = [name for name in args.optimizers if (out / name / "ckpt.pt").exists()]
    if taken:
        print(f"error: {out} already holds runs of {', '.join(taken)}; choose another --out.",
              file=sys.stderr)
        return 1
    results = []
    try:
        for name in args.optimizers:
            lr = default_lr(name, cfg.batch_size) if args.lr is None else cfg.lr
            results.append(train_one(cfg, name, lr, out / name))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished runs are in {out}/", file=sys.stderr)
        return 130
    if PartialState().is_main_process:  # under torchrun, one process writes
        write_report(results, cfg, lr_source(args.lr), out)
    return 1 if any(r.note for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

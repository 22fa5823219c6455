"""Per-epoch curves of one or several runs: report.py's curves.png and compare.py's
compare.png are the same picture of different histories."""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator


@dataclass(frozen=True)
class Panel:
    """One axis: a title, the history keys drawn on it, and how its values are shown."""

    title: str
    keys: tuple[str, ...]
    scale: float = 1.0  # e.g. 100 for accuracies in percent
    yscale: str = "linear"  # "log" for losses, "lr" for learning rates (symlog, 0 included)


def plot_history(runs: dict[str, list[dict]], panels: list[Panel]) -> Figure:
    """A row of panels; a line per run and key, labelled by the key for one run, else by run."""
    fig = Figure(figsize=(4.5 * len(panels) + 0.5, 4), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for name, history in runs.items():
            for key in panel.keys:
                label = key.split("_")[0] if len(runs) == 1 else (
                    name if len(panel.keys) == 1 else f"{name} {key}")
                ax.plot([r["epoch"] for r in history], [panel.scale * r[key] for r in history],
                        marker="o", label=label)
        ax.set(title=panel.title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if panel.yscale == "log":
            ax.set_yscale("log")
            # plain numbers: the default labels are mathtext ($10^{0}$), drawn as that raw text
            # where the report turns math off for the names it draws
            # (report_figures.text_as_written)
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter())
        elif panel.yscale == "lr":
            # LRs of different optimizers lie decades apart, and a schedule may end at 0:
            # log scale down to the smallest LR recorded, linear below it
            lrs = [r[k] for h in runs.values() for r in h for k in panel.keys if r[k] > 0]
            if lrs:
                ax.set_yscale("symlog", linthresh=min(lrs))
            ax.set_ylim(bottom=0)
        if len(runs) > 1 or len(panel.keys) > 1:
            ax.legend()
    return fig

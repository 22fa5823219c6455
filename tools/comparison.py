"""The optimizer comparison: one training run per optimizer with engine.loop.train, from the
same seed, data and options, then compare.png, compare.csv and compare.md (tools/compare.py is its
command line)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from common.atomic import atomic_writes, check_replaceable, csv_text, text_writer
from common.errors import CheckpointError, Interrupted, OutputError, RangeTestError, RunFailed
from common.hardware import launched_processes
from common.output_folders import output_dir
from common.paths import not_a_folder
from common.streams import Log
from common.wording import counted
from engine import checkpoint
from engine.config import TrainConfig
from engine.history import best_epoch, steady_seconds
from engine.launch import end_processes
from engine.loop import configure, train
from tools.plots import Panel, plot_history

# Peak LRs when --lr is left out:
# - sgd, nesterov: 0.1 per 256 images, ResNet's 0.1 at batch 256 (He et al., 2016) with the
#   linear scaling rule (Goyal et al., 2017), as the fast preset's 0.2 at batch 512. The rule's
#   batch is a step's, all processes' images together: --batch-size x processes under torchrun.
# - adam, adamw: 1e-3, the default of Kingma & Ba (2015), Loshchilov & Hutter (2019) and torch.
# - rmsprop: 1e-3, Keras' default. Torch's default is 1e-2; that it is too high once
#   engine.optimizers gives RMSprop the run's momentum is our inference, not torch's docs.
BASE_LRS = {"sgd": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
SCALED = {"sgd", "nesterov"}  # scaled linearly with the images of a step / 256
WRITTEN = ("compare.png", "compare.csv", "compare.md")  # into --out, together
FIELDS = ("optimizer", "lr", "weight_decay", "final_test_acc", "best_test_acc",
          "seconds_per_epoch", "epochs", "note")


@dataclass
class Result:
    """One optimizer's run: the LR it trained at, its per-epoch history, and why it stopped."""

    optimizer: str
    lr: float | str
    weight_decay: float
    history: list[dict]
    note: str = ""  # empty when the run finished

    def row(self) -> dict:
        """The run in one table row; its s/epoch by steady_seconds, as the GPU suite's summary
        takes them. The first epoch's warm-up is tens of seconds on a GPU beside a steady
        epoch's one or two, and cuDNN's autotuning (once a process) falls in the first
        optimizer's run only, which looked slowest for running first."""
        last, best = (self.history[-1], best_epoch(self.history)) if self.history else ({}, {})
        return dict(optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                    final_test_acc=last.get("test_acc"), best_test_acc=best.get("test_acc"),
                    seconds_per_epoch=steady_seconds(self.history),
                    epochs=len(self.history), note=self.note)


@dataclass
class Planned:
    """One optimizer's run as the comparison trains it: its config (its out the run's folder),
    and the values of it the comparison chose itself, in words (derived_words)."""

    cfg: TrainConfig
    derived: dict[str, str]


def lr_text(lr: float | str) -> str:
    """An LR for a label: 3 digits, or 'auto' where the range test never ran."""
    return f"{lr:.3g}" if isinstance(lr, float) else lr


def default_lr(optimizer: str, batch_size: int, processes: int = 1) -> float:
    """The optimizer's peak LR from BASE_LRS, scaled for SGD to the images of a step: each of
    the run's `processes` takes `batch_size` of them."""
    return BASE_LRS[optimizer] * (batch_size * processes / 256 if optimizer in SCALED else 1.0)


def default_weight_decay(optimizer: str, weight_decay: float) -> float:
    """The run's weight decay for an optimizer at its BASE_LRS LR. AdamW's is decoupled (the
    weights times 1 - lr x wd per step, its LR 1e-3), so at the run's 5e-4 it would hardly
    decay: scaled by BASE_LRS' sgd/adamw ratio, its lr x wd per step is that of the run's L2
    term in an SGD step at batch 256 before momentum, which carries SGD's on to about
    1 / (1 - momentum) times that (ours; at 5e-4 that is 0.05, the value of DeiT's and
    ConvNeXt's AdamW recipes). Adam and RMSprop add it to the gradient, as SGD does."""
    return weight_decay * (BASE_LRS["sgd"] / BASE_LRS["adamw"] if optimizer == "adamw" else 1)


def derived_words(optimizer: str, own_lrs: bool, own_decay: bool) -> dict[str, str]:
    """The LR and weight decay compare chose for `optimizer`'s run itself (own_lrs: no --lr,
    own_decay: no --weight-decay) as a refusal to resume names them (engine.resume's
    resume_config): no --lr or --weight-decay was typed, so naming one misleads."""
    words = {}
    if own_lrs:
        words["lr"] = ("the LR compare derives from the batch size" if optimizer in SCALED
                       else f"the LR compare chooses for {optimizer}")
    if own_decay:
        words["weight_decay"] = f"the weight decay compare chooses for {optimizer}"
    return words


def plan(cfg: TrainConfig, optimizers: list[str], own_lrs: bool, own_decay: bool,
         out: Path) -> list[Planned]:
    """Each optimizer's run in out/<name>, at its default LR (own_lrs: no --lr given) or
    cfg.lr, and its default weight decay (own_decay) or cfg.weight_decay."""
    runs = []
    for name in optimizers:
        lr = default_lr(name, cfg.batch_size, run_processes()) if own_lrs else cfg.lr
        decay = default_weight_decay(name, cfg.weight_decay) if own_decay else cfg.weight_decay
        runs.append(Planned(replace(cfg, optimizer=name, lr=lr, weight_decay=decay,
                                    out=str(out / name)),
                            derived_words(name, own_lrs, own_decay)))
    return runs


def run_processes() -> int:
    """The processes each run of the comparison has: the process group's, once a run has
    started it, else as launched (WORLD_SIZE)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return launched_processes()


def lr_source(lr: float | str | None, own_decay: bool, optimizers: list[str]) -> str:
    """Where the runs' LRs and weight decays came from, for the table's caption: AdamW's own
    weight decay only where AdamW is one of the `optimizers`, the others taking the run's."""
    decay = ("; weight decay: AdamW's scaled to its LR (default_weight_decay in "
             "tools/comparison.py)" if own_decay and "adamw" in optimizers
             else "; one weight decay for all")
    if lr is None:
        return "each optimizer's default (BASE_LRS in tools/comparison.py)" + decay
    if lr == "auto":
        return "each optimizer's LR range test suggestion (--lr auto)" + decay
    return f"--lr {lr:g} for all" + decay


def given_options(cfg: TrainConfig) -> dict:
    """cfg as the options a resumed run must not change (engine.resume.resume_config refuses
    others by name): all but the run folder. --lr auto is the saved LR's origin: no change."""
    return {k: v for k, v in cfg.to_dict().items() if v is not None and k != "out"}


def writes_files() -> bool:
    """Whether this process writes the comparison and says a run failed: under torchrun the
    first (the runs keep their process group until compare ends it), else the only one."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def train_one(run: Planned, log: Log, warn: Log) -> Result:
    """Train one optimizer's run with engine.loop.train, its lines to log; a run that failed
    on its own numbers (diverged, out of memory) is kept as a result, its error to warn. Any
    other error (an option this machine cannot run, fewer --epochs than done) is raised: it
    would fail every optimizer alike, and a table of those failures would replace the
    comparison. A run already in its folder (a comparison stopped and started again) is
    resumed, or reused when it is finished."""
    cfg, out = run.cfg, Path(run.cfg.out)
    resume = saved_in(out)
    torch.compiler.reset()  # the previous run's compiled graphs must not be reused or count
    try:
        trained = train(cfg, resume, given_options(cfg) if resume else None,
                        log=lambda line: log(f"{cfg.optimizer}: {line}"), end_process_group=False,
                        extend="Extend it by running this command with a larger --epochs.")
        return Result(cfg.optimizer, trained.cfg.lr, cfg.weight_decay, trained.history)
    except (RunFailed, RangeTestError) as error:  # a result, not the end
        if writes_files():  # every process failed alike: one says so
            warn(f"error: {cfg.optimizer}: {error}")
        return Result(cfg.optimizer, cfg.lr, cfg.weight_decay, saved_history(out), str(error))


def saved_in(run_dir: Path) -> Path | None:
    """run_dir where it holds a saved run, which the comparison resumes (or reuses when it is
    finished); else None, a new run."""
    return run_dir if (run_dir / "ckpt.pt").exists() else None


def check_saved(runs: list[Planned]) -> None:
    """Each run already saved checked, before any run trains, as its resume will check it
    (engine.loop.configure): an option it refuses, or fewer --epochs than it has done, stops
    the comparison before the runs ahead of it train on, its runs and compare.* files left in
    step. Every process reads the same files, so under torchrun all decide alike. A refusal
    says the run is an earlier comparison's: the options it names may be ones this command
    left out (an --lr that comparison was given)."""
    for run in runs:
        if (resume := saved_in(Path(run.cfg.out))) is None:
            continue
        try:
            configure(run.cfg, resume, given_options(run.cfg), run.derived)
        except CheckpointError as error:
            raise CheckpointError(f"{resume} holds a run of an earlier comparison that this one "
                                  f"cannot continue: {error} Give compare that comparison's "
                                  f"options (its runs' config.json) to continue it; an LR or "
                                  "weight decay it chose itself (no --lr, no --weight-decay) "
                                  "comes back with the option left out.") from None


def saved_history(run_dir: Path) -> list[dict]:
    """The epochs a stopped run saved, from its ckpt.pt: checked as it loads, where
    metrics.jsonl is a copy that a hand (or a full disk) may have cut short."""
    return checkpoint.load(run_dir / "ckpt.pt")["history"] if saved_in(run_dir) else []


# accuracy in percent, as compare.md and report's curves.png give it
PANELS = [Panel("train loss", ("train_loss",)),
          Panel("test accuracy (%)", ("test_acc",), scale=100),
          Panel("LR at the end of the epoch", ("lr",), yscale="lr")]


def plot(results: list[Result]) -> Figure:
    """Train loss, test accuracy and LR per epoch, one line per optimizer, named with its LR
    and weight decay."""
    return plot_history({f"{r.optimizer} (lr {lr_text(r.lr)}, wd {r.weight_decay:g})": r.history
                         for r in results}, PANELS)


def markdown(rows: list[dict], cfg: TrainConfig, source: str) -> str:
    """The table for a README or a pull request, with what every run shared."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    lines = [f"{counted(cfg.epochs, 'epoch')} of {cfg.dataset}, "
             f"batch {cfg.batch_size}, width {cfg.width}, {cfg.schedule} schedule, "
             f"seed {cfg.seed}; LR: {source}.", "",
             "| optimizer | lr | weight decay | final test acc | best test acc | s/epoch | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['optimizer']} | {lr_text(r['lr'])} | {r['weight_decay']:g} | "
              f"{pct(r['final_test_acc'])} | "
              f"{pct(r['best_test_acc'])} | "
              + ("-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}")
              + f" | {r['note'].split(';')[0]} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], cfg: TrainConfig, source: str, out: Path) -> str:
    """compare.png, compare.csv and compare.md into out, all three or none (a full disk, a
    folder in one's place: the earlier comparison stays whole); the table, to show too."""
    rows = [r.row() for r in results]
    table = markdown(rows, cfg, source)
    fig = plot(results)
    png, csv, md = (out / name for name in WRITTEN)
    atomic_writes({png: lambda tmp: fig.savefig(tmp, format="png", dpi=120),
                   csv: text_writer(csv_text(rows, FIELDS)),
                   md: text_writer(table)})
    return table


def train_each(runs: list[Planned], out: Path, log: Log, warn: Log) -> list[Result]:
    """Each planned run in turn. Ctrl-C (or a reader of the output gone) says how to go on:
    the same command resumes the runs, or reuses finished ones."""
    optimizers = [run.cfg.optimizer for run in runs]
    results = []
    for run in runs:
        name = run.cfg.optimizer
        try:
            result = train_one(run, log, warn)
        except (Interrupted, KeyboardInterrupt):  # the second: before train() could say more
            raise Interrupted(going_on(name, optimizers, out)) from None
        except BrokenPipeError as error:  # `| head`: the run's note said --resume, for one run
            error.__notes__ = [f"{going_on(name, optimizers, out)}."]
            raise
        results.append(result)
    return results


def going_on(name: str, optimizers: list[str], out: Path) -> str:
    """How to go on with a comparison stopped during optimizer `name`'s run."""
    if not any(saved_in(out / n) for n in optimizers):
        return f"stopped during {name}, before any run saved an epoch; run the same command again"
    # --out named: the default is a new folder on every call
    return (f"stopped during {name}; to go on, run the same command with --out {out}: its runs "
            "are resumed, or reused when finished")


def check_places(out: Path, optimizers: list[str]) -> None:
    """OutputError, before any run, for a place in `out` the comparison cannot write: a
    folder where one of its files goes, a file where an optimizer's run folder goes."""
    check_replaceable(out / name for name in WRITTEN)
    for name in optimizers:
        if (out / name).exists() and not (out / name).is_dir():
            raise OutputError(f"{out / name} {not_a_folder(out / name)}, where the {name} run of "
                              "the comparison goes; move it away, or choose another --out.")


def compare(cfg: TrainConfig, optimizers: list[str], own_lrs: bool, own_decay: bool, log: Log,
            warn: Log) -> tuple[list[Result], str | None]:
    """Train each optimizer in turn in cfg.out/<name>, each at its default LR (own_lrs: no --lr
    given) or cfg.lr and its default weight decay (own_decay) or cfg.weight_decay, their lines
    to log and the errors of runs that failed to warn, and write the comparison into cfg.out;
    the results and the markdown table, None in a process other than the one that writes."""
    out = Path(cfg.out)
    # a file or a read-only --out is named as such before any run; each run's folder goes
    # too when a failure leaves it empty
    try:
        with output_dir(out):
            check_places(out, optimizers)  # now, not after the runs
            runs = plan(cfg, optimizers, own_lrs, own_decay, out)
            check_saved(runs)  # likewise
            results = train_each(runs, out, log, warn)
            writer = writes_files()
    finally:  # the runs kept the process group for one another
        end_processes()
    if not writer:  # under torchrun, one process writes
        return results, None
    return results, write_report(results, cfg, lr_source(None if own_lrs else cfg.lr,
                                                         own_decay, optimizers), out)

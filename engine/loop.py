"""The epoch loop: train and test epochs, a checkpoint after each, and `train()`, the whole
run (a new one, or one engine.resume continues) as a library call that returns a Trained (the
resolved config, the history, where the time went) or raises an EngineError."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from common.compile_modes import compile_text
from common.errors import (
    Interrupted,
    RunFailed,
    TrainingError,
    listing,
    one_line,
)
from common.hardware import device_name
from common.locks import locked_dir
from common.progress import progress_bar
from common.stop_signals import stop_requested
from common.streams import Log, silent
from common.temporaries import sweep_temporaries
from common.wording import counted
from engine import checkpoint, lr_range
from engine.config import TrainConfig
from engine.epoch_writer import EpochWriter
from engine.evaluate import evaluate
from engine.failures import out_of_memory, peer_gone
from engine.history import best_epoch
from engine.launch import (
    end_processes,
    launcher_options_ignored,
    make_accelerator,
    resolved_here,
)
from engine.resume import download_fix, saved_run
from engine.run import Run, build, train_step
from engine.trackers import TRACKER_PROJECT, check_tracker, start_trackers


@dataclass
class Trained:
    """What a finished train() hands back."""

    cfg: TrainConfig  # as resolved and run (--lr auto's LR included)
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    main_process: bool  # the process that wrote the run directory
    # this call's share of the wall time: the epochs it trained (the last of history; fewer
    # when it resumed), the seconds it took to build the run (data, loaders, model, --lr auto's
    # range test; a compile is its first epoch's), and the seconds training waited for
    # checkpoints (the state's copies, and a write still going when the next was due)
    epochs_run: int = 0
    setup_s: float = 0.0
    checkpoint_wait_s: float = 0.0

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.cfg.out)


def diverged(run: Run, done: int, what: str) -> RunFailed:
    """The error for a run whose numbers stopped being finite: what happened, what was kept,
    and what to run next (--resume cannot help: it would continue with the same options)."""
    cfg = run.cfg
    kept = (f"{cfg.out}/ckpt.pt keeps epoch {done}, the last good one (for a report)" if done
            else "no epoch had finished, so nothing was saved")
    if cfg.precision == "fp16":
        fix = "--precision bf16 (or fp32) instead of fp16"
    elif cfg.decay_to_blame():
        fix = (f"a --weight-decay far below 1 (the default is {TrainConfig.weight_decay:g}; "
               f"it diverged with {cfg.weight_decay:.3g})")
    else:
        fix = f"a lower --lr (e.g. --lr {float(cfg.lr) / 10:.3g})"
    out = " and a new --out" if done else ""  # else the same --out is free again
    return RunFailed(f"{what}; {kept}. --resume would repeat it: start again with "
                     f"{fix}{out}.")


def out_of_memory_failure(cfg: TrainConfig, run: Run | None, processes: int) -> TrainingError:
    """The error for a failed allocation, with what to lower: --width when building the run
    (`run` None: the model, or the split --loader resident holds, did not fit), else the
    batch size that ran."""
    if run is None:
        resident = cfg.loader == "resident"
        held = " and the split --loader resident holds on the device" if resident else ""
        return TrainingError(f"out of memory building the run (the model at --width "
                             f"{cfg.width}{held}); try a smaller --width"
                             f"{' or --loader ffcv' if resident else ''}.")
    batch = run.train_loader.batch_size  # capped at the shard: the size that ran
    split = "this process's shard" if processes > 1 else "the whole split"
    whole = f" (batches of {batch}, {split})" if batch < cfg.batch_size else ""
    fix = f"--batch-size {batch // 2}" if batch > 1 else f"a --width below {cfg.width}"
    return RunFailed(f"out of memory at --batch-size {cfg.batch_size}{whole}; try {fix}.")


def train_epoch(run: Run, epoch: int, before_step: Callable[[], None]) -> dict:
    """One pass over this process's shard; metrics summed over all processes. before_step()
    runs before each step (fit's: raising a failed save of the last epoch's files)."""
    loader, acc = run.train_loader, run.accelerator
    loader.set_epoch(epoch)
    run.model.train()
    batch_losses = torch.zeros(len(loader), device=acc.device)
    correct = torch.zeros((), device=acc.device)
    seen = 0
    bar = progress_bar(len(loader), f"epoch {epoch + 1}/{run.cfg.epochs}", "batch",
                       enabled=acc.is_local_main_process)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        before_step()
        batch_losses[i], batch_correct = train_step(run, images, labels)
        correct += batch_correct
        seen += len(labels)
        if bar.due():  # reading the loss waits for the device: only when it will be shown
            loss, accuracy = batch_losses[i].item() / len(labels), correct.item() / seen
            # after the wait: images trained, not only queued (the host runs ahead on a GPU)
            rate = seen * acc.num_processes / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1%}", img_s=f"{rate:,.0f}")
        bar.update()
    bar.close()
    bad = (~torch.isfinite(batch_losses)).nonzero()
    first_bad = int(bad[0]) if len(bad) else -1
    totals = acc.reduce(torch.stack([batch_losses.sum(), correct,
                                     torch.tensor(float(seen), device=acc.device),
                                     torch.tensor(float(first_bad >= 0), device=acc.device)]),
                        "sum").tolist()  # .tolist() waits for the device: the epoch is done
    seconds = time.perf_counter() - start
    if totals[3]:
        where = f"batch {first_bad + 1}" if first_bad >= 0 else "a batch on another process"
        raise diverged(run, epoch, f"the training loss became NaN or infinite in epoch "
                                   f"{epoch + 1}, {where}")
    return dict(train_loss=totals[0] / totals[2], train_acc=totals[1] / totals[2],
                train_images=int(totals[2]), seconds=seconds,
                images_per_s=totals[2] / seconds)


def test_epoch(run: Run) -> dict:
    """Test metrics of exactly the weights that are saved: rank 0's.

    The unwrapped model is used because evaluation needs no collectives (DDP's could hang on
    shards of unequal length), and rank 0's BatchNorm statistics are broadcast first.
    """
    start = time.perf_counter()
    model = run.unwrapped
    if run.accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    loss, correct, count = run.accelerator.reduce(
        evaluate(model, run.test_loader, run.cfg.tta, run.autocast),
        "sum").tolist()
    return dict(test_loss=loss / count, test_acc=correct / count, test_images=int(count),
                eval_seconds=time.perf_counter() - start)


def summary_line(row: dict, epochs: int) -> str:
    """One finished epoch's metrics as the line printed after its progress bar. The LR is the
    one after the epoch's last step (0 at the end of a decaying schedule), as the plots say."""
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%}  test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.2%}  end lr {row['lr']:.3g}  {row['seconds']:.1f}s "
            f"{row['images_per_s']:,.0f} img/s")


def check_finite(run: Run, epoch: int, row: dict) -> None:
    """TrainingError when the epoch's test loss, or a weight or BatchNorm statistic, is NaN or
    infinite: nothing non-finite is ever saved, a checkpoint must be a state to go on from."""
    if not math.isfinite(row["test_loss"]):
        raise diverged(run, epoch, f"the test loss became NaN or infinite in epoch {epoch + 1}")
    bad = checkpoint.nonfinite(run.unwrapped.state_dict())
    if bad:
        raise diverged(run, epoch, f"{len(bad)} weights or BatchNorm statistics became NaN "
                                   f"or infinite in epoch {epoch + 1} ({listing(bad)})")


def fit(run: Run, history: list[dict], log: Log) -> float:
    """Train from len(history) to cfg.epochs. After every epoch the main process copies the
    state and writes the epoch's files on a thread while the next epoch trains, which a failed
    write stops at its next step (not when it ends: its steps are lost either way); returns
    the seconds training waited for them (the copies, and a write still going when the next
    was due or the run ended)."""
    cfg, acc, out = run.cfg, run.accelerator, Path(run.cfg.out)
    waited = 0.0
    with EpochWriter() as writer:  # however the loop ends, the last epoch's files are whole
        for epoch in range(len(history), cfg.epochs):
            row = dict(epoch=epoch + 1, **train_epoch(run, epoch, writer.check),
                       **test_epoch(run), lr=run.optimizer.param_groups[0]["lr"])
            check_finite(run, epoch, row)
            history.append(row)
            acc.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if acc.is_main_process:
                start = time.perf_counter()
                best = best_epoch(history) is row
                writer.submit(partial(checkpoint.write_epoch, out,
                                      checkpoint.content(run, history), best))
                waited += time.perf_counter() - start
                log(summary_line(row, cfg.epochs))
        start = time.perf_counter()
        writer.wait()
        waited += time.perf_counter() - start
    return waited


def configure(cfg: TrainConfig, resume: Path | None, given: dict | None,
              derived: dict[str, str] | None = None) -> tuple[TrainConfig, dict | None]:
    """The resolved config of a new run or of the run in `resume`, and its checkpoint."""
    ckpt = None
    if resume is not None:
        cfg, ckpt = saved_run(resume, given or {}, derived)
    return resolved_here(cfg), ckpt


def train(cfg: TrainConfig, resume: Path | None = None, given: dict | None = None,
          log: Log = silent, end_process_group: bool = True,
          extend: str | None = None) -> Trained:
    """Build the run (resumed from `resume`/ckpt.pt when given), train it to cfg.epochs and
    return a Trained: the resolved config, the history and where the time went; each epoch's
    line and each notice go to log (the command line's is common.streams.say). Ctrl-C raises
    Interrupted, saying what was kept; a log whose reader has gone, its BrokenPipeError with a
    note saying it.
    `end_process_group=False` keeps the process group for another run in this process
    (tools/comparison.py), which calls end_processes().
    `extend`: how to train a finished run further, said when resuming one (by default, with
    --resume and more --epochs; a tool of its own words for its own command line)."""
    cfg, ckpt = configure(cfg, resume, given)
    check_tracker(cfg.log_with, cfg.out)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    out = Path(cfg.out)
    if ckpt is not None and len(ckpt["history"]) == cfg.epochs:  # a requeued job, say
        # before the lock: nothing is written, so a run on a read-only share is finished too
        if main:
            log(f"{out} is finished ({cfg.epochs}/{cfg.epochs} epochs): nothing to train. "
                + (extend or f"Extend it with --resume {out} --epochs N, N above {cfg.epochs}."))
        if end_process_group:
            end_processes()
        return Trained(cfg, list(ckpt["history"]), main)
    try:
        # the main process owns the run folder for the whole run: a second run into it is
        # refused
        with locked_dir(out) if main else nullcontext():
            if main and ckpt is None:
                refuse_used(out)
            if main:
                sweep_temporaries(out)  # of a save that was killed midway
            # the trackers' folder, when this run makes it: of no epoch, it goes with best.pt
            logs = (out / TRACKER_PROJECT if cfg.log_with and not (out / TRACKER_PROJECT).exists()
                    else None)
            with unsaved_removed(out, logs) if main else nullcontext():
                return _train(cfg, ckpt, accelerator, log if main else silent,
                              end_process_group)
    except KeyboardInterrupt:  # wherever it landed once the run's processes were up
        raise stopped(accelerator, out) from None
    except Exception as error:
        if stop_requested():  # a Ctrl-C that a library caught and made an error of its own:
            raise stopped(accelerator, out) from None  # a stop all the same (run_main's case)
        if isinstance(error, BrokenPipeError) and main:  # `| head`: a stop too, which run_main
            error.add_note(f"{kept(out)}.")  # says (common.cli), with what was kept
        raise


@contextmanager
def unsaved_removed(out: Path, logs: Path | None) -> Iterator[None]:
    """On the way out, a first best.pt whose ckpt.pt was never written (stopped, disk full)
    removed, and the trackers' folder `logs` this run made with it: files of no saved epoch."""
    try:
        yield
    finally:
        if not (out / "ckpt.pt").exists():
            (out / "best.pt").unlink(missing_ok=True)
            if logs is not None:
                shutil.rmtree(logs, ignore_errors=True)


def refuse_used(out: Path) -> None:
    """TrainingError where a new run's `out` holds a run, or files a run writes over."""
    if (out / "ckpt.pt").exists():
        raise TrainingError(f"{out} already holds a run; continue it with --resume {out} or "
                            "choose another --out.")
    if found := [name for name in checkpoint.EPOCH_FILES if (out / name).exists()]:
        # not a run's (it saves them with its ckpt.pt): the user's own, say
        raise TrainingError(f"{out} holds {', '.join(found)}, which a run writes over; choose "
                            "another --out, or move them away.")


def stopped(accelerator: Accelerator, out: Path) -> Interrupted:
    """What a Ctrl-C kept, said by the main process, which alone waits for its writer."""
    if not accelerator.is_main_process:
        return Interrupted(f"process {accelerator.process_index} of {accelerator.num_processes} "
                           "stopped; process 0 says what was kept")
    try:
        return Interrupted(kept(out))
    except KeyboardInterrupt:  # a second Ctrl-C as ckpt.pt is read: what was kept still counts
        return Interrupted(kept(out, "the last epoch saved"))


def kept(out: Path, held: str | None = None) -> str:
    """What a run that stopped early kept in `out` and how to go on, said by the main process
    once its writer is done: the epoch ckpt.pt holds (read, not the history in memory: a
    Ctrl-C during a save keeps the previous one; `held` instead where it cannot be read) and
    the --resume command, or that nothing was saved."""
    if (out / "ckpt.pt").exists():
        held = held or f"epoch {len(checkpoint.load(out / 'ckpt.pt')['history'])}"
        return f"{out}/ckpt.pt holds {held}; continue with --resume {out}"
    return "no epoch had finished, so nothing was saved; run the same command again"


def failure(error: Exception, cfg: TrainConfig, run: Run | None,
            accelerator: Accelerator) -> Exception | None:
    """What a run that failed with `error` raises instead, where it is one of ours to say (a
    divergence every process found, a collective failed, a loader's worker dead, out of
    memory); None for any other error, raised as it is."""
    procs, index = accelerator.num_processes, accelerator.process_index
    if isinstance(error, RunFailed) and not accelerator.is_main_process:
        # diverged: found on every process at once (from reduced sums, or weights DDP keeps
        # equal), and each printed the same paragraph
        return RunFailed(f"process {index} of {procs} stops with process 0, which says why and "
                         "what to run next")
    if procs > 1 and peer_gone(error):  # not a traceback of its own
        # the collective's own words too: all of them fail alike when, say, NCCL cannot start,
        # and then no other process has more to say; the main process, whose writer is done,
        # says what was kept (a peer killed, or stopped alone, says not)
        said = f" {kept(Path(cfg.out))}." if accelerator.is_main_process else ""
        return TrainingError(f"process {index} of {procs} stops: most often another process of "
                             "this run stopped first, and its own message says why (here a "
                             f"collective failed: {one_line(error, 160)}).{said}")
    for loader in (run.train_loader, run.test_loader) if run else ():
        if (died := loader.worker_died(error)) is not None:  # raised in next(), or by torch's
            return died  # handler of the worker's SIGCHLD, anywhere
    return out_of_memory_failure(cfg, run, procs) if out_of_memory(error) else None


def _train(cfg: TrainConfig, ckpt: dict | None, accelerator: Accelerator, say: Log,
           end_process_group: bool) -> Trained:
    """train() once the run folder is held: build, restore, fit, and failures' messages."""
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"  # a resumed run's: its config's out is the --resume folder
    history: list[dict] = []
    run = None
    start = time.perf_counter()
    try:
        # a resumed run whose data must be downloaded again and cannot be: its own fix
        with download_fix(out) if ckpt else nullcontext():
            run = build(cfg, accelerator)
        if accelerator.is_main_process:  # the one that writes them
            checkpoint.check_space(out, run.unwrapped, cfg, resumed=ckpt is not None)
        if cfg.lr == "auto":  # on every process, in lockstep; sets run.cfg.lr
            say(lr_range.describe(lr_range.use_suggestion(run), cfg.schedule))
        history = checkpoint.restore(run, ckpt, ckpt_path) if ckpt else []
        trained_on = ckpt.get("processes") if ckpt else None
        if trained_on not in (None, accelerator.num_processes):
            procs = accelerator.num_processes
            say(f"{ckpt_path} trained on {counted(trained_on, 'process', 'processes')}, "
                f"this run has {procs}: its steps now take {procs} x {run.train_loader.batch_size} "
                f"images, and the schedule goes on from epoch {len(history)}.")
        n = torch.get_num_threads()
        threads = f", {counted(n, 'thread')} each" if accelerator.device.type == "cpu" else ""
        say(f"{cfg.dataset} on {device_name(accelerator.device)} x{accelerator.num_processes}"
            f"{threads}: {cfg.loader} loader, {cfg.precision}, "
            f"{compile_text(cfg.compile, cfg.compile_mode)}, "
            f"{counted(len(run.train_loader), 'step')} an epoch; writing {out}/")
        if notice := launcher_options_ignored():
            say(notice)
        if cfg.log_with:
            start_trackers(run)
        done, setup_s = len(history), time.perf_counter() - start
        checkpoint_wait_s = fit(run, history, say)
        accelerator.wait_for_everyone()  # no process exits while rank 0 is still saving
    except Exception as error:
        if (said := failure(error, cfg, run, accelerator)) is None:
            raise
        raise said from None
    finally:
        # this run's trackers; not accelerator.end_training(), which also ends the process
        # group, and a second Accelerator in this process would not start it again
        for tracker in accelerator.trackers:
            tracker.finish()
        if end_process_group:
            end_processes()
    return Trained(run.cfg, history, accelerator.is_main_process, len(history) - done, setup_s,
                   checkpoint_wait_s)

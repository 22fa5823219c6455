"""Train a CIFAR ResNet-18: `accelerate launch engine/train.py [options]` or plain python.

Data is converted once to .beton files and augmented on the device; the model is channels_last
and mixed precision; every epoch leaves an atomic ckpt.pt, metrics and config in --out.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from engine import checkpoint, lr_range
from engine.checkpoint import CheckpointError
from engine.config import TrainConfig, parse
from engine.evaluate import evaluate
from engine.model import build_model
from engine.optim import build_optimizer, build_schedule
from loaders import make_loader
from loaders.base import BatchLoader, available_cores
from loaders.cifar import DataError
from loaders.prepare import Prepared, prepare

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingError(Exception):
    """Training cannot go on (diverged, out of memory); the message says what to change."""


@dataclass
class Run:
    """Everything one training run holds; built once by `build`, used by the epoch loop."""

    cfg: TrainConfig
    accelerator: Accelerator
    data: Prepared
    train_loader: BatchLoader
    test_loader: BatchLoader
    model: nn.Module  # prepared (DDP-wrapped when distributed, autocast forward)
    step_model: nn.Module  # `model`, compiled when cfg.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def resolve(cfg: TrainConfig, cuda: bool) -> None:
    """Fill the choices that depend on the hardware, so config.json records what ran."""
    cfg.loader = cfg.loader or ("resident" if cuda else "ffcv")
    cfg.precision = cfg.precision or ("bf16" if cuda else "fp32")
    cfg.compile = cuda if cfg.compile is None else cfg.compile
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg.out = cfg.out or f"runs/{cfg.dataset}-{stamp}"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    resolve(cfg, cuda)
    if cfg.precision == "fp16" and not cuda:  # accelerate autocasts fp16 on GPUs only
        raise TrainingError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU.")
    try:
        # cpu=True is what makes accelerate use gloo for multi-process CPU runs (torchrun)
        return Accelerator(cpu=not cuda, log_with=cfg.log_with, project_dir=cfg.out,
                           mixed_precision="no" if cfg.precision == "fp32" else cfg.precision)
    except ValueError as error:  # accelerate's word for an unknown tracker or precision
        raise TrainingError(str(error)) from None


def start_trackers(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Open the --log-with trackers; accelerate silently drops one whose package is missing."""
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in cfg.to_dict().items()}
    accelerator.init_trackers("cifar10-engine", config=flat)
    if accelerator.is_main_process and not accelerator.trackers:
        raise TrainingError(f"--log-with {cfg.log_with}: its package is not installed; "
                            f"pip install {cfg.log_with} (e.g. the [tensorboard] extra).")


def loader_options(cfg: TrainConfig, data: Prepared, device: torch.device, rank: int = 0,
                   world_size: int = 1) -> dict:
    """The make_loader options a run uses for both splits (the workers shared by processes)."""
    workers = cfg.workers or max(1, available_cores() // world_size)
    return dict(device=device, mean=data.mean, std=data.std, dtype=DTYPES[cfg.precision],
                seed=cfg.seed, rank=rank, world_size=world_size, workers=workers)


def build(cfg: TrainConfig, accelerator: Accelerator) -> Run:
    """Data, loaders, model, optimizer and schedule of a run, placed by accelerate."""
    with accelerator.main_process_first():  # one process converts; the others reuse its files
        data = prepare(cfg.dataset, Path(cfg.data_dir), tuple(cfg.synthetic_size),
                       workers=cfg.workers)
    common = loader_options(cfg, data, accelerator.device, accelerator.process_index,
                            accelerator.num_processes)
    train_loader = make_loader(cfg.loader, data.train, train=True, batch_size=cfg.batch_size,
                               augment=cfg.augment(), **common)
    test_loader = make_loader(cfg.loader, data.test, train=False,
                              batch_size=2 * cfg.batch_size, **common)
    torch.manual_seed(cfg.seed)  # same initial weights on every process and every rerun
    model = build_model(cfg.arch, len(data.classes), cfg.width)
    if cfg.channels_last:  # before prepare, so DDP's buckets see the final layout
        model = model.to(memory_format=torch.channels_last)
    lr = 0.0 if cfg.lr == "auto" else float(cfg.lr)  # auto: set by the range test below
    optimizer = build_optimizer(cfg.optimizer, model, lr, cfg.weight_decay,
                                cfg.momentum, cfg.decay_norm_bias)
    # the schedule is stepped by us once per batch, not prepared: accelerate would step it
    # once per process
    scheduler = build_schedule(cfg.schedule, optimizer, cfg.epochs * len(train_loader),
                               warmup_frac=cfg.warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    step_model = torch.compile(model) if cfg.compile else model
    run = Run(cfg, accelerator, data, train_loader, test_loader, model, step_model, optimizer,
              scheduler)
    if cfg.lr == "auto":  # on every process, in lockstep; sets cfg.lr and the schedule
        lr_range.use_suggestion(run, train_step)
    return run


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step; returns (loss summed over the batch, correct) without a host sync."""
    if not run.cfg.channels_last:
        images = images.contiguous()
    logits = run.step_model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=run.cfg.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()


def train_epoch(run: Run, epoch: int) -> dict:
    """One pass over this process's shard; metrics summed over all processes."""
    loader, acc = run.train_loader, run.accelerator
    loader.set_epoch(epoch)
    run.model.train()
    batch_losses = torch.zeros(len(loader), device=acc.device)
    correct = torch.zeros((), device=acc.device)
    seen = 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{run.cfg.epochs}", unit="batch",
               leave=False, dynamic_ncols=True, disable=not acc.is_local_main_process)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        batch_losses[i], batch_correct = train_step(run, images, labels)
        correct += batch_correct
        seen += len(labels)
        bar.update()
        if i % 10 == 0 and not bar.disable:  # a host sync, so only now and then
            rate = seen * acc.num_processes / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{batch_losses[i].item() / len(labels):.3f}",
                            acc=f"{correct.item() / seen:.1%}", img_s=f"{rate:,.0f}")
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
        raise TrainingError(
            f"the training loss became NaN or infinite in epoch {epoch + 1}, {where}; "
            f"{run.cfg.out}/ckpt.pt keeps the last good epoch. Lower --lr, or use "
            "--precision bf16/fp32 instead of fp16.")
    return dict(train_loss=totals[0] / totals[2], train_acc=totals[1] / totals[2],
                train_images=int(totals[2]), seconds=seconds,
                images_per_s=totals[2] / seconds)


def test_epoch(run: Run) -> dict:
    """Test metrics of exactly the weights that are saved: rank 0's.

    The unwrapped model is used because evaluation needs no collectives (DDP's could hang on
    shards of unequal length), and rank 0's BatchNorm statistics are broadcast first.
    """
    start = time.perf_counter()
    model = run.accelerator.unwrap_model(run.model)
    if run.accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    loss, correct, count = run.accelerator.reduce(
        evaluate(model, run.test_loader, run.cfg.tta), "sum").tolist()
    return dict(test_loss=loss / count, test_acc=correct / count, test_images=int(count),
                eval_seconds=time.perf_counter() - start)


def make_checkpoint(run: Run, history: list[dict], with_state: bool) -> dict:
    """ckpt.pt's content (DESIGN.md): plain containers and fp32 CPU tensors only."""
    model = run.accelerator.unwrap_model(run.model)
    weights = {k: (v.float() if v.is_floating_point() else v).detach().cpu()
               for k, v in model.state_dict().items()}
    ckpt = dict(
        format=checkpoint.FORMAT, version=checkpoint.VERSION, arch=run.cfg.arch,
        width=run.cfg.width, num_classes=len(run.data.classes), state_dict=weights,
        classes=run.data.classes, mean=run.data.mean, std=run.data.std,
        config=run.cfg.to_dict(), history=history, epoch=len(history),
        data=dict(dataset=run.data.name, data_dir=str(Path(run.cfg.data_dir).resolve()),
                  train=str(run.data.train.resolve()), test=str(run.data.test.resolve()),
                  source=str(run.data.source.resolve())),
        device=_device_name(run.accelerator), processes=run.accelerator.num_processes,
        torch=str(torch.__version__),  # a TorchVersion object would not load with weights_only
    )
    if with_state:  # what --resume needs beyond the weights
        scaler = run.accelerator.scaler
        ckpt["resume"] = dict(optimizer=run.optimizer.state_dict(),
                              scheduler=run.scheduler.state_dict(),
                              scaler=scaler.state_dict() if scaler is not None else None,
                              rng=torch.get_rng_state())
    return ckpt


def _device_name(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"cpu ({platform.processor() or platform.machine()}, {available_cores()} cores)"


def restore(run: Run, ckpt: dict) -> list[dict]:
    """Load weights and optimizer, schedule, scaler and RNG state; return the history so far."""
    if "resume" not in ckpt:
        raise CheckpointError("this checkpoint has no optimizer state (best.pt?); resume from "
                              "the run's ckpt.pt")
    run.accelerator.unwrap_model(run.model).load_state_dict(ckpt["state_dict"])
    state = ckpt["resume"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return ckpt["history"]


def summary_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%}  test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.2%}  lr {row['lr']:.3g}  {row['seconds']:.1f}s "
            f"{row['images_per_s']:,.0f} img/s")


def fit(run: Run, history: list[dict]) -> list[dict]:
    """Train from len(history) to cfg.epochs, saving after every epoch (main process only)."""
    cfg, acc, out = run.cfg, run.accelerator, Path(run.cfg.out)
    for epoch in range(len(history), cfg.epochs):
        row = dict(epoch=epoch + 1, **train_epoch(run, epoch), **test_epoch(run),
                   lr=run.optimizer.param_groups[0]["lr"])
        history.append(row)
        acc.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        if acc.is_main_process:
            best = max(history, key=lambda r: r["test_acc"])
            if best is row:
                checkpoint.save(out / "best.pt", make_checkpoint(run, history, with_state=False))
            checkpoint.save(out / "ckpt.pt", make_checkpoint(run, history, with_state=True))
            checkpoint.write_metrics(out, history)
            tqdm.write(summary_line(row, cfg.epochs))
    return history


def train(cfg: TrainConfig, resume: Path | None) -> int:
    ckpt = None
    if resume is not None:
        ckpt = checkpoint.load(resume / "ckpt.pt")
        cfg = TrainConfig(**{**ckpt["config"], "out": str(resume)})
    elif cfg.out and (Path(cfg.out) / "ckpt.pt").exists():
        raise TrainingError(f"{cfg.out} already holds a run; continue it with --resume "
                            f"{cfg.out} or choose another --out.")
    accelerator = make_accelerator(cfg)
    out = Path(cfg.out)
    history: list[dict] = []
    try:
        run = build(cfg, accelerator)  # inside: --lr auto trains, and can be interrupted
        history = restore(run, ckpt) if ckpt else []
        if accelerator.is_main_process:  # only now: a run that cannot start leaves nothing
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(out / "config.json", cfg.to_dict())
            accelerator.print(f"{cfg.dataset} on {_device_name(accelerator)} x"
                              f"{accelerator.num_processes}: {cfg.loader} loader, "
                              f"{cfg.precision}, compile {'on' if cfg.compile else 'off'}, "
                              f"{len(run.train_loader)} steps/epoch; writing {out}/")
        if cfg.log_with:
            start_trackers(accelerator, cfg)
        fit(run, history)
        accelerator.wait_for_everyone()  # no process exits while rank 0 is still saving
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            print(f"\ninterrupted: {out}/ckpt.pt holds epoch {len(history)}; continue with "
                  f"--resume {out}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of memory at --batch-size {cfg.batch_size}; try "
                            f"--batch-size {max(1, cfg.batch_size // 2)}.") from None
    finally:
        accelerator.end_training()
        if torch.distributed.is_initialized():  # else gloo's threads die at exit: SIGABRT
            torch.distributed.destroy_process_group()
    if accelerator.is_main_process and history:
        best = max(history, key=lambda r: r["test_acc"])
        total = sum(r["seconds"] for r in history)
        print(f"best test accuracy {best['test_acc']:.2%} at epoch {best['epoch']}; "
              f"{total:.1f}s of training; saved {out}/ckpt.pt, best.pt, metrics.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse(argv)
    try:
        return train(cfg, resume)
    except (DataError, CheckpointError, TrainingError, lr_range.RangeTestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

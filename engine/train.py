"""Train a CIFAR ResNet-18: `accelerate launch engine/train.py [options]`, plain python, or
`cifar-train`. Data is converted once to .beton files and, but with --loader torchvision,
augmented on the device; the model is channels_last, and mixed precision on a GPU (fp32 on the
CPU); every epoch leaves an atomic ckpt.pt, metrics and config in --out. The training itself
is engine.loop.train; this is its command line."""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli import interruptible_imports, run_main
from common.streams import say
from common.wording import counted
from engine.history import best_epoch, time_spent
from engine.options import parse


def main(argv: list[str] | None = None) -> int:
    """Train as the command line says, then print the final and best accuracy; the exit status
    comes from run_main, so a known error or Ctrl-C is one line, not a traceback."""
    options = parse(argv)  # first: --help and a refused option answer before torch loads
    with interruptible_imports():  # torch and the rest take seconds to import
        from engine.loop import train

    def body() -> None:
        result = train(options.cfg, options.resume, options.given, log=say)
        if result.main_process and result.history:
            say(accuracy_line(result.history, result.out if result.epochs_run else None))
            if result.epochs_run:  # where this command's time went
                ran = result.history[-result.epochs_run:]
                epochs = counted(result.epochs_run, "epoch")
                say(f"{epochs}: {time_spent(ran):.1f}s of training, "
                    f"{time_spent(ran, 'eval_seconds'):.1f}s of evaluation, "
                    f"{result.checkpoint_wait_s:.1f}s waiting for checkpoints; "
                    f"{result.setup_s:.1f}s building the run before them")

    return run_main(body)


def accuracy_line(history: list[dict], saved: Path | None) -> str:
    """The last epoch's test accuracy, the run's result, then the best one, which best.pt
    keeps: picked on the test set (CIFAR has no validation split), so it is optimistic.
    `saved`: the run folder this command wrote, if any (a finished run resumed saved nothing,
    and its best.pt may even be gone)."""
    last, best = history[-1], best_epoch(history)
    files = f"; saved {saved}/ckpt.pt, best.pt, metrics.csv" if saved is not None else ""
    return (f"final test accuracy {last['test_acc']:.2%} at epoch {last['epoch']}; "
            f"best test accuracy {best['test_acc']:.2%} at epoch {best['epoch']} (best.pt, "
            f"picked on the test set){files}")


if __name__ == "__main__":
    sys.exit(main())

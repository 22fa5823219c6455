"""Train a CIFAR ResNet-18: `accelerate launch engine/train.py [options]`, plain python, or
`cifar-train`. Data is converted once to .beton files and augmented on the device; the model is
channels_last and mixed precision; every epoch leaves an atomic ckpt.pt, metrics and config in
--out. The training itself is engine.loop.train; this is its command line."""

from __future__ import annotations

import sys

from common.cli import interruptible_imports, run_main
from engine.options import parse


def main(argv: list[str] | None = None) -> int:
    """Train as the command line says, then print the best accuracy; the exit status comes
    from run_main, so a known error or Ctrl-C is one line, not a traceback."""
    options = parse(argv)  # first: --help and a refused option answer before torch loads
    with interruptible_imports():  # torch and the rest take seconds to import
        from engine.loop import train

    def body() -> None:
        result = train(options.cfg, options.resume, options.given, log=print)
        if result.main_process and result.history:
            best = max(result.history, key=lambda r: r["test_acc"])
            # a finished run resumed saved nothing (its best.pt may even be gone)
            saved = (f"; saved {result.out}/ckpt.pt, best.pt, metrics.csv" if result.epochs_run
                     else "")
            print(f"best test accuracy {best['test_acc']:.2%} at epoch {best['epoch']}{saved}")
            if result.epochs_run:  # where this command's time went
                ran = result.history[-result.epochs_run:]
                epochs = f"{result.epochs_run} epoch{'s' * (result.epochs_run != 1)}"
                print(f"{epochs}: {sum(r['seconds'] for r in ran):.1f}s of training, "
                      f"{sum(r['eval_seconds'] for r in ran):.1f}s of evaluation, "
                      f"{result.checkpoint_wait_s:.1f}s waiting for checkpoints; "
                      f"{result.setup_s:.1f}s building the run before them")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

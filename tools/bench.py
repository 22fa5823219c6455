"""`python tools/bench.py` (or `cifar-bench`): loaders, peers, steps, epochs, MFU and a profile.

Every figure of a report is measured in the same run, so ratios between them hold on a noisy,
shared machine. The peers section puts public CIFAR-10 loaders (airbench, stock FFCV, the seed
notebook's DataLoader) beside ours. Training FLOPs per image are counted by FlopCounterMode over
a forward and backward pass; MFU is images/s x FLOPs per image over the dense matmul peak of
the step's dtype, itself timed in the same run. The profile section runs training steps under
torch.profiler: the ops that took the most time, and a Chrome trace beside --json.
"""

from __future__ import annotations

import os
import sys

from common.cli import interruptible_imports, run_main, summary
from common.stop_signals import stop_if_interrupted
from common.streams import error_line, say
from common.wording import counted
from tools.bench_options import parse_args


def log(line: str) -> None:
    """Progress on stdout, flushed so a redirected log is complete at every moment; like any
    progress update, it raises a Ctrl-C again that a finalizer swallowed
    (common.stop_signals)."""
    say(line)
    stop_if_interrupted()


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen sections, print the tables and write --json; 1 when a row failed
    (its reason is in its table), so a script sees an incomplete run."""
    argv = sys.argv[1:] if argv is None else argv
    # first: --help and a refused option answer before torch loads
    args = parse_args(argv, summary(__doc__))
    # kineto, torch.profiler's backend, logs every profile's start and stop (and without a CUDA
    # driver an ERROR that it found no GPU): 21 lines amid the tables of --quick
    # (benchmarks/results/kineto-lines-cpu-2core.log). Above its highest level it logs
    # nothing; a level you set wins. Read when a first profile starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with interruptible_imports():  # torch and the rest take seconds to import
        from tools.bench_output import report
        from tools.bench_run import failed, run_bench, serializable

    def body() -> int:
        results = run_bench(args, argv, log)
        log(report(results))
        if args.json:
            log(f"wrote {args.json}")
        bad = failed(serializable(results))
        if bad:
            error_line(f"error: {counted(bad, 'measurement')} failed; each one's reason is in "
                       "its table above.")
        return 1 if bad else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

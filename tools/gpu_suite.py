"""`bash tools/gpu_suite.sh [STEP ...]` (or `make gpu STEP=...`): the GPU validation in steps.

The steps (tools/gpu_steps.py) run in the order given (tools/gpu_run.py), every log and JSON
written to one results folder. Each step has a time limit, so one slow step cannot take the
lease from the ones after it. --budget ends the whole run in time: a command is killed at it and
later steps are recorded as not run. --bundle packs the results into one .tar.gz after every
command (for machines that hand back few files). --dry-run runs the same commands on the CPU
with tiny sizes. On a machine without ffcv or grad-cam, the wheels in the checkout's .whl/
(tools/wheelhouse.sh) are installed first (tools/gpu_environment.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from common.atomic import ENCODING
from common.cli import CommandParser, path_option, run_main, summary
from common.errors import SetupError
from common.output_folders import make_dir
from common.paths import not_a_file, place_problem
from common.streams import error_line, say
from tools import ROOT
from tools.gpu_environment import environment, header
from tools.gpu_run import run_steps
from tools.gpu_steps import GROUPS, STEPS, Suite, suite_device


def outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The results folder and the bundle. With $OUT set (a machine that hands back a few files
    of one folder) and no --results, the folder is a new temporary one and the bundle
    $OUT/gpu-suite.tar.gz; otherwise the folder is --results, else a temporary one for a dry
    run (its CPU figures must not land beside a GPU's, where `git add` would take them), else
    benchmarks/results/gpu-<date>/."""
    out = os.environ.get("OUT")
    bundle = args.bundle or (Path(out) / "gpu-suite.tar.gz" if out else None)
    if bundle is not None:  # found now, not after the first command
        bundle = bundle.absolute()
        problem = not_a_file(bundle)
        problem = f"it {problem}" if problem else place_problem(bundle)
        if problem:
            raise SetupError(f"--bundle {bundle}" + (" (from $OUT)" if args.bundle is None else "")
                             + f": {problem}; name a .tar.gz file in a writable folder.")
    if args.results is not None:
        return args.results.absolute(), bundle
    if out or args.dry_run:  # fresh: a second call on one machine bundles nothing stale
        return Path(tempfile.mkdtemp(prefix="gpu-suite-results-")), bundle
    return ROOT / "benchmarks" / "results" / f"gpu-{datetime.date.today().isoformat()}", bundle


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The suite's options, checked: a bad step name, --budget or --bundle is a usage error."""
    p = CommandParser(prog="bash tools/gpu_suite.sh", description=summary(__doc__))
    p.add_argument("steps", nargs="*", default=["all"], metavar="STEP",
                   help=f"any of {', '.join(STEPS)}, or the groups {', '.join(GROUPS)} "
                        "(default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every command on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="end the whole run within this many seconds (wheel install included): "
                        "a command still running then is killed, later steps are not run")
    p.add_argument("--results", type=path_option("write the results into the current folder"),
                   help="default: a temporary folder when $OUT is set or with --dry-run, "
                        "else benchmarks/results/gpu-<date>/")
    p.add_argument("--bundle", type=Path, metavar="FILE.tar.gz",
                   help="pack the results folder into this file after every command, with "
                        "FILE.summary.md beside it (default: $OUT/gpu-suite.tar.gz when $OUT "
                        "is set)")
    p.add_argument("--site", type=path_option("install the wheels into the current folder"),
                   default=Path(tempfile.gettempdir()) / "site",
                   help="where the .whl/ wheels are installed when needed (default: /tmp/site)")
    p.add_argument("--work", type=path_option("put the data and runs in the current folder"),
                   help="data and run folders (default: a temporary one)")
    args = p.parse_args(argv)
    unknown = [step for step in args.steps if step not in STEPS and step not in GROUPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}, "
                f"{', '.join(GROUPS)}")
    if args.budget is not None and not 0 < args.budget < math.inf:  # nan meant no budget
        p.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if args.bundle is not None and not args.bundle.name.endswith(".tar.gz"):
        p.error(f"--bundle {args.bundle}: name a .tar.gz file")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen steps; exit 1 if any failed or did not run."""
    start = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    steps = list(dict.fromkeys(s for name in args.steps for s in GROUPS.get(name, (name,))))

    def body() -> int:
        if not args.dry_run and importlib.util.find_spec("torch") is not None:
            import torch

            if not torch.cuda.is_available():
                raise SetupError("torch sees no CUDA GPU here; run on a GPU machine, or check "
                                 "the commands on the CPU with --dry-run.")
        results, bundle = outputs(args)
        make_dir(results, "--results")  # a file there: named, with the fix
        env = environment(sys.executable, args.site.absolute())
        meta = header(sys.executable, env, suite_device(args.dry_run), argv, args.dry_run)
        deadline = start + args.budget if args.budget else math.inf
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            # absolute: the commands run in the checkout, the caller named them from elsewhere
            work = args.work.absolute() if args.work else Path(tmp)
            suite = Suite(results, work, sys.executable, env, args.dry_run,
                          meta, steps, deadline, bundle)
            failed = run_steps(suite)
        say((results / "summary.md").read_text(encoding=ENCODING))
        say(f"results in {results}" + (f", packed into {bundle}" if bundle else ""))
        if failed:
            error_line(f"failed or not run: {', '.join(failed)}")
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

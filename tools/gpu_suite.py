"""`bash tools/gpu_suite.sh STEP` (or `make gpu STEP=...`): the GPU validation as steps that each
end within 9 minutes, every log, JSON and summary written to one results folder.

Steps: tests (pytest -m gpu), bench-step, bench-epoch and bench-peers (tools/bench.py in three
parts), train (the fast preset on 50k synthetic images with and without torch.compile, and the
seed pipeline); `bench` is the three bench steps, `all` every step. --dry-run runs the same commands
on the CPU with tiny sizes, to check them without a GPU. On a machine without ffcv or
grad-cam, the wheels in the checkout's .whl/ (tools/wheelhouse.sh) are installed first.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import run_main
from common.errors import SetupError
from common.files import write_json

ROOT = Path(__file__).resolve().parents[1]
STEP_LIMIT_S = 530  # every step ends (its command killed) before 9 minutes
STEPS = ("tests", "bench-step", "bench-epoch", "bench-peers", "train")
GROUPS = {"all": STEPS, "bench": ("bench-step", "bench-epoch", "bench-peers")}
NEEDED = ("ffcv", "pytorch_grad_cam")  # what a bare GPU image lacks; the wheels provide them
EPOCHS = 24  # the fast preset's; GPU_SUITE_EPOCHS lowers it when a step would run too long

# the header of every log: tools/bench_output.metadata, in the environment the steps run in
HEADER = ("import json, sys, torch; from importlib.metadata import version; "
          "from tools.bench_output import metadata; "
          "m = metadata(torch.device(sys.argv[1]), []); "
          "m.update({p: version(p) for p in ('numba', 'grad-cam', 'pytest')}); "
          "print(json.dumps(m))")


@dataclass
class Suite:
    """Where a suite writes, how its commands run, and whether it is a CPU dry run."""

    results: Path
    work: Path  # data and run folders: large, so kept out of the results
    python: str
    env: dict
    dry: bool
    argv: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def script(self, path: str, *args: str) -> list[str]:
        return [self.python, str(ROOT / path), *args]


# --- the steps: named commands ----------------------------------------------------------


def tests_step(s: Suite) -> list[tuple[str, list[str]]]:
    """pytest on the tests marked gpu (skipped, not run, in a dry run on the CPU); verbose, so
    a step killed at its time limit still shows which tests passed."""
    return [("pytest", [s.python, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
                        "--durations", "0", "--junitxml", str(s.results / "tests.xml"),
                        str(ROOT / "tests" / "test_gpu.py")])]


def bench(s: Suite, name: str, sections: str, full: list[str], dry: list[str]) -> list:
    """One tools/bench.py run of `sections` with its JSON in the results."""
    return [(name, s.script("tools/bench.py", "--device", s.device, "--sections", sections,
                            "--data-dir", str(s.work / "data"),
                            "--json", str(s.results / f"{name}.json"),
                            *(dry if s.dry else full)))]


def bench_step_step(s: Suite) -> list:
    """The bf16 and fp16 step grid (format x compile at batch 512, then batch 256 and 1024):
    8 of its 10 configurations compile, about 40 s each."""
    return bench(s, "bench-step", "step,mfu", ["--precisions", "bf16,fp16"],
                 ["--quick", "--precisions", "bf16", "--formats", "channels_last"])


def bench_epoch_step(s: Suite) -> list:
    """Loaders over 50k images, the fp32 step grid at batch 512, full 50k-image epochs with
    each loader, the MFU of all of them, and a profile (with its trace) of the default run's
    steps."""
    return bench(s, "bench-epoch", "loaders,step,epoch,mfu,profile",
                 ["--precisions", "fp32", "--batch-sizes", "512"],
                 ["--quick", "--precisions", "fp32", "--formats", "channels_last",
                  "--images", "256", "--epoch-images", "256"])


def bench_peers_step(s: Suite) -> list:
    """airbench's loader, stock FFCV and the seed DataLoader beside ours over 50k images, then
    a 50k-image training epoch of the seed pipeline beside the default preset."""
    return bench(s, "bench-peers", "peers", [],
                 ["--quick", "--images", "256", "--peer-epoch-images", "128"])


def train_step(s: Suite) -> list:
    """engine/train.py: the fast preset compiled and eager, then the seed notebook's pipeline."""
    epochs = os.environ.get("GPU_SUITE_EPOCHS", str(EPOCHS))
    data = ["--dataset", "synthetic", "--data-dir", str(s.work / "data")]
    if s.dry:
        data += ["--synthetic-size", "256", "64", "--width", "8"]
        epochs = "1"
    compile = [] if s.dry else ["--compile"]  # CUDA's default, said explicitly
    runs = {"train-fast-compile": ["--epochs", epochs, *compile],
            "train-fast-eager": ["--epochs", epochs, "--no-compile"],
            "train-seed": ["--preset", "seed", "--loader", "torchvision", "--precision",
                           "fp32", "--no-compile", "--no-channels-last", "--epochs", "2"]}
    return [(name, s.script("engine/train.py", *data, *args, "--out", str(s.work / name)))
            for name, args in runs.items()]


COMMANDS = {"tests": tests_step, "bench-step": bench_step_step,
            "bench-epoch": bench_epoch_step, "bench-peers": bench_peers_step,
            "train": train_step}


# --- the environment -------------------------------------------------------------------


def missing(python: str, env: dict) -> dict[str, str]:
    """Which of NEEDED `python` cannot import with `env`, each with its error's last line."""
    code = ("import importlib, sys\n"
            f"for name in {NEEDED!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as error:\n"
            "        last = (str(error).splitlines() or [''])[-1]\n"
            "        print(name, type(error).__name__ + ':', last)")
    result = subprocess.run([python, "-c", code], env=env, cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SetupError(f"{python} cannot run: {result.stderr.strip()[-500:]}")
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def environment(python: str, site: Path) -> dict:
    """The steps' environment: the checkout on PYTHONPATH, and the .whl/ wheels installed into
    `site` (and put first on it) when ffcv or grad-cam cannot be imported otherwise."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    paths.insert(0, str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    lacking = missing(python, env)
    if not lacking:
        return env
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise SetupError(f"{python} cannot import {', '.join(lacking)} and {ROOT / '.whl'} "
                         "holds no wheels. Run `make setup` (a .venv with everything), or build "
                         "the wheels with `make wheels` on a machine with network and copy .whl/ "
                         "into this checkout.")
    print(f"installing {len(wheels)} wheels from .whl/ into {site}", flush=True)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                              "--target", str(site), *map(str, wheels)],
                             capture_output=True, text=True)
    if install.returncode != 0:
        raise SetupError(f"pip could not install the wheels of .whl/ into {site}: "
                         f"{install.stderr.strip()[-800:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
    lacking = missing(python, env)
    if lacking:
        why = "; ".join(f"{name}: {error}" for name, error in lacking.items())
        raise SetupError(f"after installing .whl/ into {site}, {python} still cannot import "
                         f"{why}. Install what is named, or rebuild the wheels for this Python "
                         "with `make wheels`.")
    return env


def header(s: Suite, step: str) -> dict:
    """What ran where: tools/bench_output.metadata of the device, plus the suite's own."""
    result = subprocess.run([s.python, "-c", HEADER, s.device], env=s.env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"cannot read the device and library versions with {s.python}: "
                         f"{result.stderr.strip()[-800:]}")
    meta = json.loads(result.stdout.splitlines()[-1])
    meta.update(command=shlex.join(["bash", "tools/gpu_suite.sh", *s.argv]), argv=s.argv,
                step=step, dry_run=s.dry, pythonpath=s.env["PYTHONPATH"])
    if os.environ.get("GPU_SUITE_COMMIT"):  # a copied checkout without .git says which commit
        meta["commit"] = os.environ["GPU_SUITE_COMMIT"]
    return meta


# --- running a step ----------------------------------------------------------------------


def run_command(argv: list[str], env: dict, log, timeout: float) -> tuple[int | None, float]:
    """argv with its output appended to `log`; (return code or None when killed at timeout,
    seconds). The command runs in its own process group so a timeout ends its children too."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    return code, time.perf_counter() - start


def keep_run(s: Suite, name: str) -> None:
    """Copy a training run's small files (not its checkpoints) into the results."""
    run = s.work / name
    if run.is_dir():
        (s.results / name).mkdir(exist_ok=True)
        for file in ("config.json", "metrics.jsonl", "metrics.csv"):
            if (run / file).exists():
                shutil.copy2(run / file, s.results / name / file)


def run_step(s: Suite, step: str) -> bool:
    """One step: its log (header, then every command's output), its summary JSON; True if
    every command succeeded within the step's time limit."""
    meta = header(s, step)
    commands = COMMANDS[step](s)
    deadline = time.monotonic() + STEP_LIMIT_S
    done = []
    log_path = s.results / f"{step}.log"
    with open(log_path, "w") as log:
        log.writelines(f"# {key}: {value}\n" for key, value in meta.items())
        for name, argv in commands:
            left = deadline - time.monotonic()
            print(f"{step}: {name} (at most {left:.0f} s)", flush=True)
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            code, seconds = run_command(argv, s.env, log, left)
            log.write(f"# {name}: " + (f"exit {code}" if code is not None else
                                       f"killed after {seconds:.0f} s (step limit)")
                      + f", {seconds:.1f} s\n")
            log.flush()
            keep_run(s, name)
            done.append(dict(name=name, argv=argv, returncode=code, seconds=round(seconds, 1)))
            if code != 0:
                break
    ok = len(done) == len(commands) and all(c["returncode"] == 0 for c in done)
    write_json(s.results / f"{step}.summary.json", dict(meta=meta, ok=ok, commands=done))
    if not ok:
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        print(f"{step}: FAILED; the whole log is {log_path}", file=sys.stderr)
    else:
        print(f"{step}: ok ({sum(c['seconds'] for c in done):.0f} s), log {log_path}")
    return ok


def results_folder(given: Path | None) -> Path:
    """--results, else $OUT (the device machine's returned folder), else a dated folder."""
    if given is None and os.environ.get("OUT"):
        given = Path(os.environ["OUT"])
    if given is None:
        given = ROOT / "benchmarks" / "results" / f"gpu-{datetime.date.today().isoformat()}"
    return given


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash tools/gpu_suite.sh", description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default="all", choices=[*STEPS, *GROUPS])
    p.add_argument("--dry-run", action="store_true",
                   help="run every command on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--results", type=Path, help="default: $OUT, else "
                                                "benchmarks/results/gpu-<date>/")
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "site",
                   help="where the .whl/ wheels are installed when needed (default: /tmp/site)")
    p.add_argument("--work", type=Path, help="data and run folders (default: a temporary one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen steps; exit 1 if any failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def body() -> int:
        if not args.dry_run and importlib.util.find_spec("torch") is not None:
            import torch

            if not torch.cuda.is_available():
                raise SetupError("torch sees no CUDA GPU here; run on a GPU machine, or check "
                                 "the commands on the CPU with --dry-run.")
        results = results_folder(args.results)
        results.mkdir(parents=True, exist_ok=True)
        env = environment(sys.executable, args.site)
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            work = args.work or Path(tmp)
            suite = Suite(results, work, sys.executable, env, args.dry_run, argv)
            steps = GROUPS.get(args.step, (args.step,))
            failed = [step for step in steps if not run_step(suite, step)]
        print(f"results in {results}")
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""What the GPU suite's commands run with: the checkout on PYTHONPATH, the .whl/ wheels
installed where a bare GPU image lacks ffcv or grad-cam, and the header of every log."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

from common.errors import SetupError
from common.streams import say
from tools import ROOT

# what a bare GPU image lacks; the wheels provide them. The steps write .beton files and train on
# the ffcv loader; only report's and predict's runs and tests need grad-cam (and its torchvision,
# OpenCV, scikit-learn and SciPy, which the wheels do not carry), so the other steps run
# without it
NEEDED = ("ffcv",)
WANTED = ("pytorch_grad_cam",)

VERSIONED = ("numba", "grad-cam", "pytest")  # in the header beside metadata's own

# the header of every log: tools/bench_output.metadata, in the environment the steps run in
# (and /dev/shm's size: the torchvision DataLoader's workers pass batches through it, and a
# container's small default would end them in a bus error)
HEADER = """\
import json, os, shutil, sys, torch
from importlib.metadata import PackageNotFoundError, version
from tools.bench_output import metadata
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:  # None in the header; the steps that need it fail alone
        return None
m = metadata(torch.device(sys.argv[1]), [])
m.update({p: installed(p) for p in sys.argv[2:]})
m['dev_shm_bytes'] = shutil.disk_usage('/dev/shm').total if os.path.isdir('/dev/shm') else None
print(json.dumps(m))
"""


def missing(python: str, env: dict, names: tuple[str, ...]) -> dict[str, str]:
    """Which of `names` `python` cannot import with `env`, each with its error's last line.
    FFCV is imported as the steps import it (loaders.guards.importing_ffcv: seconds faster),
    its error the ImportError beneath the guard's advice, which is for a checkout's .venv."""
    code = ("import importlib\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        if name != 'ffcv':  # the guard needs torch, which a probe may not\n"
            "            importlib.import_module(name)\n"
            "            continue\n"
            "        from loaders.guards import importing_ffcv\n"
            "        with importing_ffcv():\n"
            "            importlib.import_module(name)\n"
            "    except Exception as error:\n"
            "        error = error.__cause__ or error\n"
            "        last = (str(error).splitlines() or [''])[-1]\n"
            "        print(name, type(error).__name__ + ':', last)")
    result = subprocess.run([python, "-c", code], env=env, cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SetupError(f"{python} cannot run: {result.stderr.strip()[-500:]}")
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def environment(python: str, site: Path) -> dict:
    """The steps' environment: the checkout on PYTHONPATH, and the .whl/ wheels installed into
    `site` (and put first on it) when ffcv or grad-cam cannot be imported otherwise; .whl/lib
    (tools/wheelhouse.sh) goes on LD_LIBRARY_PATH if ffcv still cannot load its libraries."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    paths.insert(0, str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    lacking = missing(python, env, NEEDED + WANTED)
    if not lacking:
        return env
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels and not set(lacking) & set(NEEDED):
        return going_without(lacking, env)
    if not wheels:
        raise SetupError(f"{python} cannot import {', '.join(lacking)} and {ROOT / '.whl'} "
                         "holds no wheels. Run `make setup` (a .venv with everything), or build "
                         "the wheels with `make wheels` on a machine with network and copy .whl/ "
                         "into this checkout.")
    say(f"installing {len(wheels)} wheels from .whl/ into {site}")
    # --upgrade: a second suite on the same machine replaces the wheels a first one installed
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                              "--upgrade", "--target", str(site), *map(str, wheels)],
                             capture_output=True, text=True)
    if install.returncode != 0:
        raise SetupError(f"pip could not install the wheels of .whl/ into {site}: "
                         f"{install.stderr.strip()[-800:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
    lacking = missing(python, env, NEEDED + WANTED)
    libs = ROOT / ".whl" / "lib"
    if libs.is_dir() and any(".so" in error for error in lacking.values()):
        # an image without X11: the libraries that ffcv's bundled libGLX needs, carried
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (env.get("LD_LIBRARY_PATH"), str(libs)) if p)
        say(f"adding {libs} to LD_LIBRARY_PATH: {'; '.join(lacking.values())}")
        lacking = missing(python, env, NEEDED + WANTED)
    if set(lacking) & set(NEEDED):
        why = "; ".join(f"{name}: {error}" for name, error in lacking.items())
        raise SetupError(f"after installing .whl/ into {site}, {python} still cannot import "
                         f"{why}. Install what is named, or rebuild the wheels for this Python "
                         "with `make wheels`.")
    return going_without(lacking, env)


def going_without(lacking: dict[str, str], env: dict) -> dict:
    """env, after saying which of WANTED the steps go without (their runs and tests fail)."""
    for name, error in lacking.items():
        say(f"warning: {name} cannot be imported ({error}); report's and predict's runs "
            "and tests will fail, the other steps run")
    return env


def header(python: str, env: dict, device: str, argv: list[str], dry: bool) -> dict:
    """What ran where, read once: tools/bench_output.metadata of the device, plus the suite's
    own (the commit comes from git, else from $GPU_SUITE_COMMIT for a copy without .git)."""
    result = subprocess.run([python, "-c", HEADER, device, *VERSIONED], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"cannot read the device and library versions with {python}: "
                         f"{result.stderr.strip()[-800:]}")
    meta = json.loads(result.stdout.splitlines()[-1])
    meta.update(command=shlex.join(["bash", "tools/gpu_suite.sh", *argv]), argv=argv,
                dry_run=dry, pythonpath=env["PYTHONPATH"])
    return meta

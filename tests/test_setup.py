"""`make setup` where FFCV's system needs are missing: installed with apt-get as root, otherwise
named. Run on copies of the Makefile with NEEDS=false (as if the check failed) and a PATH of
the tools each case has, stand-ins that log their arguments among them, so no test installs
anything. The installing path itself is shown by the bare-system logs
(benchmarks/results/*-setup-cpu-2core.log)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import MAKE, ROOT

APT = "libopencv-dev libturbojpeg0-dev pkg-config python3-venv python3-dev build-essential"


def script(path: Path, body: str) -> None:
    """An executable shell script at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def setup_with(tmp_path: Path, uid: int, apt_get: bool) -> subprocess.CompletedProcess:
    """`make setup` in a copy of the project's Makefile, as user `uid`, with or without an
    apt-get on PATH (one that logs its arguments and DEBIAN_FRONTEND to tmp_path/apt-get.log
    and does nothing)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    tools = tmp_path / "bin"
    script(tools / "id", f"echo {uid}")
    if apt_get:
        log = tmp_path / "apt-get.log"
        script(tools / "apt-get", f'echo "apt-get $* (DEBIAN_FRONTEND=$DEBIAN_FRONTEND)" >> {log}')
    return subprocess.run([shutil.which("make"), "--no-print-directory", "setup", "NEEDS=false"],
                          cwd=tmp_path, env={"PATH": str(tools)}, capture_output=True,
                          text=True, timeout=60)


def stopped_with(result: subprocess.CompletedProcess, message: str) -> bool:
    """Whether setup said `message` and stopped there: make's own line for the recipe's exit 1
    next, nothing more (going on, it failed later on whatever came next, its message lost in
    the noise, or worse, installed half a venv)."""
    return result.returncode == 2 and re.fullmatch(
        re.escape(message) + r"\nmake: \*\*\* \[Makefile:\d+: \.venv/\.installed\] Error 1\n",
        result.stderr) is not None


@pytest.mark.parametrize("uid", [0, 1000])
def test_without_apt_get_setup_names_what_to_install(tmp_path, uid):
    """Fedora, Arch, a conda image: not 'apt-get: not found' but what FFCV's build needs."""
    result = setup_with(tmp_path, uid, apt_get=False)
    assert stopped_with(result, (
        "setup: FFCV's build needs opencv and libjpeg-turbo with their pkg-config files, "
        "pkg-config, a C++ compiler, and Python's headers and venv module; install your "
        f"system's packages of them (on Debian and Ubuntu: {APT})")), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["Makefile", "bin", "pyproject.toml"]  # no .venv


def test_as_a_user_setup_names_the_packages_to_install_with_sudo(tmp_path):
    result = setup_with(tmp_path, 1000, apt_get=True)
    assert stopped_with(result, f"setup: missing system packages; run: sudo apt-get install {APT}"
                        ), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["Makefile", "bin", "pyproject.toml"]  # no apt-get.log


def test_as_root_setup_installs_the_packages_with_apt_get(tmp_path):
    """Root on Debian or Ubuntu (a bare container): apt-get's lists, then the packages, asking
    nothing (no prompt can be answered in a `make`); then on to the venv, which this PATH
    lacks python3 for."""
    result = setup_with(tmp_path, 0, apt_get=True)
    assert (tmp_path / "apt-get.log").read_text().splitlines() == [
        "apt-get update -qq (DEBIAN_FRONTEND=)",
        f"apt-get install -y -qq {APT} (DEBIAN_FRONTEND=noninteractive)"], result.stderr
    assert "setup:" not in result.stderr


PROJECT = ".[dev,bench,export]"  # every extra: the tests exercise the bench's peers and exports
UV = f"venv -m uv pip install -q --compile-bytecode --python .venv/bin/python -e {PROJECT}"


BY_UV = ["venv -m pip install -q uv", UV, "  TMPDIR=.venv/tmp"]
BY_PIP = f"venv -m pip install -q -e {PROJECT}"


@pytest.mark.parametrize("fails, want, installed", [
    pytest.param('"-m pip --version"', ["python3 -m venv --clear .venv"], False, id="no-pip"),
    pytest.param("", BY_UV, True, id="uv"),
    pytest.param('"-m uv "*', [*BY_UV, BY_PIP], True, id="uv-fails"),
    pytest.param('"-m uv "* | "-m pip install -q -e "*', [*BY_UV, BY_PIP], False,
                 id="both-fail")])
def test_a_venv_without_pip_is_made_again_and_one_with_pip_is_installed_into(tmp_path, fails,
                                                                            want, installed):
    """A .venv left half made (Ctrl-C in ensurepip, `python3 -m venv` run by hand without
    Debian's python3-venv) has a python but no pip: `test -x` took it, and every `make` after
    failed on 'No module named pip'. One with pip gets the project with every extra, by uv
    (its temporary files in .venv/tmp, removed after: astral-sh/uv#14385; bytecode compiled as
    pip does), or by pip where uv fails; then, and only then, the stamp that makes the next
    `make` skip it all.
    Stand-ins for python3 and the venv's python log their arguments (and a TMPDIR set for
    them), so nothing is installed, the latter failing where its arguments match `fails` (a
    shell pattern); the system check is passed (NEEDS=true)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    calls = tmp_path / "calls"
    script(tmp_path / "bin" / "python3", f'echo "python3 $*" >> {calls}; exit 1')
    tmpdir = f'[ -z "$TMPDIR" ] || echo "  TMPDIR=${{TMPDIR#{tmp_path}/}}" >> {calls}'
    failing = f'case "$*" in {fails}) exit 1;; esac' if fails else ""
    script(tmp_path / ".venv" / "bin" / "python", f'echo "venv $*" >> {calls}; {tmpdir}; {failing}')
    tools = f"{tmp_path / 'bin'}:{Path(shutil.which('mkdir')).parent}"
    result = subprocess.run([shutil.which("make"), "--no-print-directory", "setup", "NEEDS=true"],
                            cwd=tmp_path, env={"PATH": tools}, capture_output=True, text=True,
                            timeout=60)
    assert calls.read_text().splitlines() == ["venv -m pip --version", *want], result.stderr
    assert result.returncode == (0 if installed else 2), result.stderr
    assert (tmp_path / ".venv" / ".installed").exists() == installed
    assert not (installed and (tmp_path / ".venv" / "tmp").exists())


def test_ci_runs_make_test_in_the_repository_root_and_fails_with_it(tmp_path):
    """.ci/run, CI's entry point, started from another folder: `make test` (the whole suite,
    not test-fast) in the repository root, and CI fails with it. A stand-in make logs where and
    what it ran, and fails."""
    calls = tmp_path / "calls"
    script(tmp_path / "bin" / "make", f'echo "$PWD: make $*" >> {calls}; exit 3')
    result = subprocess.run([str(ROOT / ".ci" / "run")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert result.returncode == 3 and calls.read_text() == f"{ROOT}: make test\n", result.stderr


def test_each_make_target_runs_its_command_with_step_and_args(tmp_path):
    """What the docs show as `make train ARGS=...`, `make gpu STEP=... ARGS=...` and the like
    runs the script test_docs checks those ARGS against (conftest.MAKE), with them; `make test`
    lints then runs every test, `make test-fast` those not marked slow. Setup is done (the
    stamp newer than pyproject.toml); stand-ins for the venv's python and for bash log their
    arguments."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    calls = tmp_path / "calls"
    script(tmp_path / ".venv" / "bin" / "python", f'echo "python $*" >> {calls}')
    script(tmp_path / "bin" / "bash", f'echo "bash $*" >> {calls}')
    (tmp_path / ".venv" / ".installed").touch()
    runs = [["train", "ARGS=--epochs 10"], ["bench", "ARGS=--quick"], ["report", "ARGS=--x y"],
            ["gpu"], ["gpu", "STEP=train", "ARGS=--dry-run"], ["test", "JOBS=3", "ARGS=-x"],
            ["test-fast", "JOBS=3"]]
    for target, *args in runs:
        result = subprocess.run([shutil.which("make"), "--no-print-directory", target, *args],
                                cwd=tmp_path, env={"PATH": str(tmp_path / "bin")},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (target, result.stderr)
    lint = "python -m ruff check ."
    assert calls.read_text().splitlines() == [
        f"python {MAKE['train']} --epochs 10", f"python {MAKE['bench']} --quick",
        f"python {MAKE['report']} --x y", f"bash {MAKE['gpu']} all",  # every step, by default
        f"bash {MAKE['gpu']} train --dry-run",
        lint, "python -m pytest -q -n 3 --durations=15 -x",
        lint, "python -m pytest -q -n 3 -m not slow"]

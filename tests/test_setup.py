"""`make setup` where FFCV's system needs are missing: installed with apt-get as root, otherwise
named. Run on copies of the Makefile with NEEDS=false (as if the check failed) and a PATH of
the tools each case has, so no test installs anything. The installing path itself is shown by
the bare-system logs (benchmarks/results/*-setup-cpu-2core.log)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

APT = "libopencv-dev libturbojpeg0-dev pkg-config python3-venv python3-dev build-essential"


def setup_with(tmp_path: Path, uid: int, apt_get: bool) -> subprocess.CompletedProcess:
    """`make setup` in a copy of the project's Makefile, as user `uid`, with or without an
    apt-get on PATH (one that would do nothing)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (tools / "id").chmod(0o755)
    if apt_get:
        (tools / "apt-get").symlink_to(shutil.which("true"))
    return subprocess.run([shutil.which("make"), "--no-print-directory", "setup", "NEEDS=false"],
                          cwd=tmp_path, env={"PATH": str(tools)}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("uid", [0, 1000])
def test_without_apt_get_setup_names_what_to_install(tmp_path, uid):
    """Fedora, Arch, a conda image: not 'apt-get: not found' but what FFCV's build needs."""
    result = setup_with(tmp_path, uid, apt_get=False)
    assert result.returncode == 2 and result.stderr.startswith(
        "setup: FFCV's build needs opencv and libjpeg-turbo with their pkg-config files, "
        "pkg-config, a C++ compiler, and Python's headers and venv module; install your "
        f"system's packages of them (on Debian and Ubuntu: {APT})\n"), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["Makefile", "bin", "pyproject.toml"]  # no .venv


def test_as_a_user_setup_names_the_packages_to_install_with_sudo(tmp_path):
    result = setup_with(tmp_path, 1000, apt_get=True)
    assert result.returncode == 2 and result.stderr.startswith(
        f"setup: missing system packages; run: sudo apt-get install {APT}\n"), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["Makefile", "bin", "pyproject.toml"]


def script(path: Path, body: str) -> None:
    """An executable shell script at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("with_pip", [False, True])
def test_a_venv_without_pip_is_made_again_and_one_with_pip_is_kept(tmp_path, with_pip):
    """A .venv left half made (Ctrl-C in ensurepip, `python3 -m venv` run by hand without
    Debian's python3-venv) has a python but no pip: `test -x` took it, and every `make` after
    failed on 'No module named pip'. Stand-ins for python3 and the venv's python log their
    arguments, so nothing is installed; the system check is passed (NEEDS=true)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    calls = tmp_path / "calls"
    script(tmp_path / "bin" / "python3", f'echo "python3 $*" >> {calls}; exit 1')
    pip = "exit 0" if with_pip else 'case "$*" in "-m pip --version") exit 1;; esac'
    script(tmp_path / ".venv" / "bin" / "python", f'echo "venv $*" >> {calls}; {pip}')
    tools = f"{tmp_path / 'bin'}:{Path(shutil.which('mkdir')).parent}"
    result = subprocess.run([shutil.which("make"), "--no-print-directory", "setup", "NEEDS=true"],
                            cwd=tmp_path, env={"PATH": tools}, capture_output=True, text=True,
                            timeout=60)
    made = calls.read_text().splitlines()
    assert made[0] == "venv -m pip --version"
    if with_pip:  # kept: the install went on with it
        assert result.returncode == 0 and "python3 -m venv --clear .venv" not in made, made
        assert made[1] == "venv -m pip install -q uv"
    else:
        assert result.returncode == 2 and made[1:] == ["python3 -m venv --clear .venv"], made

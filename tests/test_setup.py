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

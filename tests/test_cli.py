"""Every command line runs the ways users start it: by path, with -m, and as an installed
console script; and errors end in one line, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from common.cli import run_main
from common.errors import DataError, Interrupted

SCRIPTS = {  # path -> (module, console script)
    "engine/train.py": ("engine.train", "cifar-train"),
    "loaders/prepare.py": ("loaders.prepare", "cifar-prepare"),
    "tools/report.py": ("tools.report", "cifar-report"),
    "tools/bench.py": ("tools.bench", "cifar-bench"),
    "tools/lr_find.py": ("tools.lr_find", "cifar-lr-find"),
    "tools/compare.py": ("tools.compare", "cifar-compare"),
    "tools/predict.py": ("tools.predict", "cifar-predict"),
    "tools/export.py": ("tools.export", "cifar-export"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_by_path_as_a_module_and_as_a_console_script(script):
    module, console = SCRIPTS[script]
    executable = shutil.which(console, path=str(Path(sys.executable).parent))
    assert executable, f"{console} is not installed beside {sys.executable}; pip install -e ."
    for command in ([sys.executable, str(ROOT / script)], [sys.executable, "-m", module],
                    [executable]):
        result = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert result.stdout.startswith("usage:"), (command, result.stdout[:200])


def test_run_main_maps_errors_to_one_line_and_an_exit_code(capsys):
    def fails():
        raise DataError("data/x is missing; run prepare")

    def stopped():
        raise Interrupted("runs/a/ckpt.pt holds epoch 2")

    def unwritable():
        Path("/proc/definitely/not/here").write_text("x")

    assert run_main(lambda: None) == 0
    assert run_main(lambda: 3) == 3
    assert run_main(fails) == 1
    assert capsys.readouterr().err == "error: data/x is missing; run prepare\n"
    assert run_main(stopped) == 130
    assert capsys.readouterr().err.strip() == "interrupted: runs/a/ckpt.pt holds epoch 2"
    assert run_main(unwritable) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use /proc/definitely/not/here") and "\n" not in err[:-1]

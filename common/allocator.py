"""torch's memory-allocator settings, checked before torch loads: its core libraries parse them
as they load, and one they cannot parse ('garbage', 'a:b:c') ends the process in a failed C++
assertion and a core dump (torch 2.15), before any Python code could say which setting it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
# torch's core libraries loaded alone, with no core file: tens of milliseconds, where importing
# torch takes seconds. No torch to find is no abort to report (the probe then fails quietly).
PROBE = """
import ctypes, importlib.util, os, resource
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
lib = os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib")
for name in ("libc10.so", "libc10_cuda.so", "libc10_hip.so"):
    if os.path.exists(os.path.join(lib, name)):
        ctypes.CDLL(os.path.join(lib, name))
"""
BUG_REPORT = ", please report a bug to PyTorch."  # torch's words for any failed assertion


def _aborts(env: dict[str, str]) -> str | None:
    """What torch's failed assertion says where loading it with `env` aborts, else None (it
    loads, or the probe could not run: nothing to report then)."""
    try:
        child = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               errors="replace", env=env, check=False)
    except OSError:
        return None
    if child.returncode != -signal.SIGABRT:
        return None
    return next((line.split("what():", 1)[1].replace(BUG_REPORT, ";").strip()
                 for line in child.stderr.splitlines() if "what():" in line), "no message")


def allocator_problem() -> str | None:
    """Why torch would abort as it loads on the allocator settings in the environment, naming
    the one(s) it aborts on, or None (always where none is set: no child process then)."""
    given = [name for name in VARIABLES if os.environ.get(name, "").strip()]
    if not given or (what := _aborts(dict(os.environ))) is None:
        return None
    culprits = given
    if len(given) > 1:  # torch reads one of them: the one that aborts alone is the one to fix
        others = {name: value for name, value in os.environ.items() if name not in given}
        culprits = [n for n in given if _aborts({**others, n: os.environ[n]})] or given
    settings = ", ".join(f"{name}={os.environ[name]!r}" for name in culprits)
    return (f"torch aborts as it loads with the allocator setting {settings} ({what}); write it "
            "as option:value pairs separated by commas (expandable_segments:True, say), or "
            "unset it.")

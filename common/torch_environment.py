"""What in torch's environment breaks its import, said in one line naming it: a TORCH_LOGS it
cannot parse (torch raises a ValueError with pages of names as it loads, and TORCH_LOGS=help
raises its help text the same way) or another setting torch refuses as it loads (PYTORCH_JIT=abc:
a ValueError traceback too), a TORCHINDUCTOR_CACHE_DIR that is no folder (torch._dynamo makes it
as it loads, and every run failed on 'File exists', even one that compiles nothing,
without the variable's name), a current folder that was deleted (MKL then fails to load torch:
'Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so', 2), and an address-space limit
(ulimit -v) below what torch's libraries, or FFCV's, take to load (an ImportError traceback:
'libtorch_cpu.so: failed to map segment from shared object')."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from types import TracebackType

from common.paths import in_the_way, not_a_folder

# folders torch makes as its modules load (torch._dynamo: the inductor cache's)
CACHE_FOLDERS = ("TORCHINDUCTOR_CACHE_DIR",)


def cache_folder_problem() -> str | None:
    """Why a cache folder torch makes as it loads cannot be made where the environment puts
    it (a file stands there, or above it), naming the variable; None where it can."""
    for name in CACHE_FOLDERS:
        if not (value := os.environ.get(name, "")):
            continue
        if (there := in_the_way(Path(value))) is not None:
            return (f"{name}={value!r}: {there} {not_a_folder(there)}; torch makes its cache "
                    "there as it loads. Point it at a folder (it is created when missing), or "
                    "unset it.")
    return None


def deleted_cwd_problem() -> str | None:
    """Why torch cannot load from this current folder: it was deleted (removed by another
    program, or a checkout, while a shell stood in it); None where it exists."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return ("the current folder was deleted, and torch cannot load from it; cd to a folder "
                "that exists (`cd \"$PWD\"` if it was made again) and run the command again.")
    return None


def _raised_in(trace: TracebackType | None, package: str) -> bool:
    """Whether the innermost frame of `trace` is in torch's `package` ("" for any of torch)."""
    last = None
    while trace is not None:
        last, trace = trace.tb_frame, trace.tb_next
    return last is not None and f"{os.sep}{os.path.join('torch', package, '')}" in (
        last.f_code.co_filename)


def torch_setting_problem(error: BaseException) -> str | None:
    """For an error of torch's import: what to print where it is torch refusing a setting of
    the environment (a ValueError of its own code: TORCH_LOGS, PYTORCH_JIT, ...), ending in one
    error line; None for any other error. torch's words come first only for TORCH_LOGS=help and
    +help, whose text is the help the user asked for."""
    if not isinstance(error, ValueError) or not _raised_in(error.__traceback__, ""):
        return None
    value = os.environ.get("TORCH_LOGS")
    if value is None or not _raised_in(error.__traceback__, "_logging"):
        return (f"error: torch cannot load: {' '.join(str(error).split())} Correct or unset the "
                "environment variable it names.")
    if value.strip() in ("help", "+help"):
        return (f"{str(error).strip()}\nerror: TORCH_LOGS={value!r} prints torch's log names "
                "(above) and runs nothing; unset it to run the command.")
    return (f"error: torch cannot load with TORCH_LOGS={value!r}: it is no comma-separated list "
            "of torch's log names (TORCH_LOGS=help lists them); correct it, or unset it.")


def address_space_problem(error: BaseException, what: str) -> str | None:
    """For an error of importing `what` (torch, FFCV): why, where one of its libraries did not
    fit under this process's address-space limit (glibc's 'failed to map segment' with
    RLIMIT_AS set); None for any other error."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if (not isinstance(error, ImportError) or limit == resource.RLIM_INFINITY
            or "failed to map segment" not in str(error)):
        return None
    return (f"{what} cannot load under this process's address-space limit (ulimit -v "
            f"{limit // 1024} KiB: {str(error).split(':', 1)[0]} does not fit); raise it "
            "(`ulimit -v unlimited`; torch takes several GiB of address space) and run again.")

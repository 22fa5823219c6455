"""The machine a process runs on: its cores and a readable name for a device."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when a GPU's name is asked for
    import torch


def available_cores() -> int:
    """Cores this process may run on (not the machine's count, which containers inflate)."""
    return len(os.sched_getaffinity(0))


def default_workers(processes: int = 1) -> int:
    """Loader workers per process when none are asked for: the cores, shared by processes."""
    return max(1, available_cores() // processes)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model and the cores this process may use."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {available_cores()} cores)"

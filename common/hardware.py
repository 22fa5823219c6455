"""The machine a process runs on and the run it belongs to: the cores and memory it may use,
a device's readable name, and how many processes a launcher started."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import SetupError
from common.wording import counted

if TYPE_CHECKING:  # torch is imported only when a GPU is asked about (device_name, native_bf16)
    import torch


def available_cores() -> int:
    """Cores this process may run on (not the machine's count, which containers inflate)."""
    return len(os.sched_getaffinity(0))


def beyond_cores(option: str, count: int) -> str | None:
    """Why `count` workers or threads are too many for `option`, or None: more than the cores
    this process may use are no faster, and each torchvision worker is a process (99999999999
    of them filled the machine's memory)."""
    cores = available_cores()
    if count <= cores:
        return None
    return (f"{option} {count}: this process may use {counted(cores, 'core')}; pass "
            f"{option} {cores}{' or fewer' * (cores != 1)}")


# each logical CPU's hyper-thread siblings: one string per physical core
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Physical cores among those this process may use: a core's hyper-threads count once, as
    in torch's own default thread count (c10's defaultNumThreads: cpuinfo's cores). The
    logical count where the topology cannot be read."""
    cpus = os.sched_getaffinity(0)
    try:
        return len({(CPU_TOPOLOGY / f"cpu{cpu}/topology/thread_siblings_list").read_text()
                    for cpu in cpus})
    except OSError:
        return len(cpus)


def local_share(count: int, processes: int) -> int:
    """`count` (cores) shared by this machine's processes of the run: LOCAL_WORLD_SIZE, as
    torchrun and accelerate launch set it; else all `processes`, on one machine. On 2
    machines of 8 GPUs each, dividing by all 16 processes left half of each one's cores idle."""
    here = positive_count(os.environ.get("LOCAL_WORLD_SIZE", "")) or processes
    return max(1, count // min(here, processes))


def default_workers(processes: int = 1) -> int:
    """Loader workers per process when none are asked for: the cores this process may use,
    hyper-threads included, shared by this machine's processes of the run."""
    return local_share(available_cores(), processes)


def positive_count(value: str) -> int | None:
    """`value`, a setting's text, as a count of 1 or more (a launcher's WORLD_SIZE,
    LOCAL_WORLD_SIZE, TORCHELASTIC_MAX_RESTARTS; OMP_NUM_THREADS, NUMBA_NUM_THREADS); None when
    it is none: not a number, below 1, or digits int() reads no value from ('²')."""
    with contextlib.suppress(ValueError):
        if int(value) >= 1:
            return int(value)
    return None


# set in each process by torchrun (TORCHELASTIC_RUN_ID) and by accelerate launch
LAUNCHED = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")


def launched() -> bool:
    """Whether torchrun or accelerate launch started this process (not plain python)."""
    return any(k in os.environ for k in LAUNCHED)


def first_of_machine() -> bool:
    """Whether this process is its machine's first (LOCAL_RANK 0, or no launcher's): the one
    that says what every process of the machine would say alike."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def launched_processes() -> int:
    """This run's processes as torchrun or accelerate launch started them (their WORLD_SIZE);
    1 for a plain `python` run. A WORLD_SIZE that is no count of processes (left over in a
    shell, say) is refused by name, and so is a RANK of no process of it: set by hand, it
    waited in the rendezvous for ever, for peers that no rank can complete (a RANK that is no
    number, accelerate's own error names)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not (count := positive_count(value)):
        raise SetupError(f"WORLD_SIZE={value!r} is not a number of processes: torchrun and "
                         "accelerate launch set it; unset it (`unset WORLD_SIZE`) for a "
                         "one-process run.")
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(ValueError):
        if count > 1 and not 0 <= int(rank) < count:
            raise SetupError(f"RANK={rank!r} is no process of WORLD_SIZE={count} (0 to "
                             f"{count - 1}): torchrun and accelerate launch set both; give each "
                             "process its own RANK in that range, or unset both for a "
                             "one-process run.")
    return count


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


def native_bf16() -> bool:
    """Whether this machine's GPU computes bf16 natively: compute capability 8.0 (Ampere) and
    up. Older GPUs (a T4, a V100) have no bf16 tensor cores, and inductor will not compile bf16
    for them (torch/_inductor/compile_fx.py: "does not support bfloat16 compilation")."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _kb_values(path: Path) -> dict[str, int]:
    """The `Name:  N kB` lines of a /proc file, in bytes; {} where it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value.split()[0]) * 1024 for key, _, value in
            (line.partition(":") for line in lines) if value.strip().endswith("kB")}


def available_memory() -> int:
    """Bytes this process can still allocate: the least headroom under each limit there is,
    the system's available memory, the address space (ulimit -v), a container's memory limit
    (cgroup v2 or v1)."""
    headrooms = [_kb_values(Path("/proc/meminfo")).get(
        "MemAvailable", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))]
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        headrooms.append(soft - _kb_values(Path("/proc/self/status")).get("VmSize", 0))
    try:
        membership = Path("/proc/self/cgroup").read_text()
    except OSError:
        membership = ""
    return max(0, min(headrooms + cgroup_headrooms(CGROUPS, membership)))


# the memory cgroups' mount points: the controller by which /proc/self/cgroup names this
# process's cgroup there ("" in v2's one hierarchy), then the files of its limit, its usage
# and (in memory.stat) its reclaimable cache
CGROUPS = {Path("/sys/fs/cgroup"): ("", ("memory.max", "memory.current", "inactive_file")),
           Path("/sys/fs/cgroup/memory"): ("memory", ("memory.limit_in_bytes",
                                                      "memory.usage_in_bytes",
                                                      "total_inactive_file"))}


def cgroup_folders(root: Path, controller: str, membership: str) -> list[Path]:
    """The folders under mount `root` of the cgroups whose limits hold this process, by
    `membership` (/proc/self/cgroup's lines): its own and each above it (Slurm and
    `systemd-run -p MemoryMax` limit a cgroup below the root; a container's is its root)."""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):  # v2's "" in its "0::<path>" line
            below = Path(path.lstrip("/"))
            return [root / below, *(root / above for above in below.parents)]
    return [root]


def cgroup_headrooms(cgroups: dict[Path, tuple[str, tuple[str, str, str]]],
                     membership: str) -> list[int]:
    """Bytes left under each memory limit of the cgroups holding this process
    (cgroup_folders), at `cgroups`' mount points."""
    headrooms = []
    for root, (controller, names) in cgroups.items():
        for folder in cgroup_folders(root, controller, membership):
            with contextlib.suppress(OSError, ValueError):  # no such cgroup, or no limit ("max")
                headrooms.append(_cgroup_headroom(folder, *names))
    return headrooms


def _cgroup_headroom(cgroup: Path, limit: str, usage: str, cache: str) -> int:
    """Bytes left under a cgroup's memory limit (a container's, which MemAvailable does not
    show); its inactive file cache counts as free, since the kernel reclaims it first. v1
    says "no limit" with a number near 2**63, which then never is the least headroom."""
    fields = (cgroup / "memory.stat").read_text().split()  # "name value" lines
    stat = dict(zip(fields[::2], fields[1::2], strict=True))
    used = int((cgroup / usage).read_text()) - int(stat.get(cache, 0))
    return int((cgroup / limit).read_text()) - used

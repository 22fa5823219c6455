"""Data fixtures shared by the tests: small CIFAR-format folders written like the original
files, image folders (--dataset folder), tar.gz archives, a local HTTP server, a prepared
synthetic dataset, a bounded way to drain a loader, and one dry run of the GPU suite (whose
bench runs tests/test_bench.py reads); and what several modules ask of a process they start
(its children, its DataLoader workers, a bounded wait for it to reach some point)."""

from __future__ import annotations

import getpass
import io
import os
import pickle
import pickletools
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import beton, cifar, folders, layouts
from loaders.preparation import Prepared, prepare

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts run from here
# make targets that pass ARGS (and gpu's STEP) on, and the script each runs: the commands the
# docs show as `make train ARGS=...` (test_docs) and the Makefile's recipes (test_setup)
MAKE = {"train": "engine/train.py", "bench": "tools/bench.py", "report": "tools/report.py",
        "gpu": "tools/gpu_suite.sh"}


def launcher_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's torchrun or accelerate launch: the shell's, but its
    temporary folder in the test's own (torch's elastic agent left a torchelastic_* folder in
    /tmp during one CI run) and the launchers' own choice of threads, not one the shell
    exported."""
    tmp = tmp_path / "launcher-tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, "TMPDIR": str(tmp)}


def torchrun_env(tmp_path: Path) -> dict[str, str]:
    """launcher_env for torchrun on one machine, whose rendezvous waits for minutes, starting
    no process, where this machine's hostname does not resolve (a bare Debian chroot's did
    not): a failure that names the fix at once instead (accelerate launch starts there)."""
    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None)
        unresolved = None
    except OSError as error:
        unresolved = error.strerror
    if unresolved:  # outside the except: the failure alone, not the lookup's traceback too
        pytest.fail(f"torchrun cannot start here: this machine's hostname {host!r} does not "
                    f"resolve ({unresolved}); add it to /etc/hosts.")
    # a port of its own for the rendezvous (torchrun reads PET_<option>): at its default,
    # 29500, two launchers on two test workers at once failed with EADDRINUSE
    return {**launcher_env(tmp_path), "PET_MASTER_PORT": str(free_port())}


def run_script(script: str, *args, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python <script> <args>`, from the repository root unless cwd= says otherwise, as a user
    runs it; text output."""
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def with_head(script: str, *args) -> tuple[str, int, str]:
    """`python script args | head -1`: the line head takes, then the exit code and stderr of
    the command once that reader has gone."""
    process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    process.stdout.close()  # head has its line
    process.wait(timeout=600)
    with process.stderr:
        return line, process.returncode, process.stderr.read()


def in_process(capsys: pytest.CaptureFixture, main: Callable[[list[str]], int],
               *args) -> subprocess.CompletedProcess:
    """A command's main(args) run in this process, its exit code and output as run_script
    gives a process's: for the rows of a test beside the one it runs as a real process (a
    process spends seconds importing torch)."""
    code = main([str(arg) for arg in args])
    said = capsys.readouterr()
    return subprocess.CompletedProcess([main.__module__, *map(str, args)], code, said.out,
                                       said.err)


def small_config(prepared: Prepared, tmp_path: Path, **options):
    """The resolved CPU config of a run of the `prepared` synthetic split into tmp_path/run:
    width 4, batches of 64, the resident loader, eager; `options` change its TrainConfig."""
    from engine.config import TrainConfig, resolve

    fields = dict(dataset="synthetic", data_dir=str(prepared.source.parent),
                  synthetic_size=SYNTHETIC_SIZE, width=4, batch_size=64, loader="resident",
                  compile=False, workers=1, out=str(tmp_path / "run"))
    return resolve(TrainConfig(**{**fields, **options}), cuda=False)


def small_run(prepared: Prepared, tmp_path: Path, **options):
    """A real run (engine.run.build) of small_config's config on the CPU."""
    from engine.launch import make_accelerator
    from engine.run import build

    cfg = small_config(prepared, tmp_path, **options)
    return build(cfg, make_accelerator(cfg))


def run_code(code: str, *args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -c <code> <args>` from the repository root, its output captured as text."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def ended_pid() -> int:
    """The pid of a process that has ended: a writer that is gone (a fixed number might be
    a live process on the host)."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie no one reaps has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


T = TypeVar("T")  # what a wait_until condition returns


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               process: subprocess.Popen | None = None, interval: float = 0.02) -> T:
    """Call condition() every `interval` s until it returns a truthy value, and return that
    value; fail the test with `what` once `timeout` s have passed, or as soon as `process` has
    exited (its exit code and, where it was piped, the tail of its stderr added). For a test
    that waits for a process it started to reach some point: bounded, so a run that never
    gets there fails instead of hanging the suite, and polled, so the test acts on what it
    waited for at once (a worker killed on sight). A wait that goes on past the process's
    exit to an assertion of its own leaves `process` out and puts the exit in the condition
    (`... or proc.poll() is not None`)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: {_ended(process)}")
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} (waited {timeout} s)")
        time.sleep(interval)
    return value


def _ended(process: subprocess.Popen) -> str:
    """How `process`, which has exited, ended: its exit code and its stderr's tail if piped."""
    said = ""
    if process.stderr is not None:
        # bounded: a child of the process (a DataLoader worker) may still hold the pipe open,
        # and then the message goes without it
        with suppress(subprocess.TimeoutExpired):
            said = process.communicate(timeout=5)[1] or ""
    if isinstance(said, bytes):
        said = said.decode(errors="replace")
    tail = f"; its stderr ends:\n{said[-3000:]}" if said.strip() else ""
    return f"process {process.pid} exited with {process.returncode}{tail}"


def children(pid: int) -> list[tuple[int, bytes]]:
    """The child processes of `pid` with their command lines (Linux's /proc)."""
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [(int(c), Path(f"/proc/{c}/cmdline").read_bytes()) for c in found]


def data_workers(pid: int) -> list[int]:
    """The DataLoader workers of process `pid`: the processes under it torch named
    pt_data_worker. Not its children with its command line: a .beton writer's workers have it
    too, and so has a subprocess before its exec; and from Python 3.14 the workers are the
    children of a forkserver, itself a child."""
    def read(path: str) -> str:
        with suppress(OSError):  # the process ended meanwhile
            return Path(path).read_text()
        return ""

    workers, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        children = read(f"/proc/{p}/task/{p}/children").split()
        todo += children
        workers += [int(c) for c in children
                    if read(f"/proc/{c}/comm").strip() == "pt_data_worker"]
    return workers


def run_gpu_suite(*args, python: str = sys.executable, timeout: float = 900,
                  out: Path | None = None) -> subprocess.CompletedProcess:
    """`bash tools/gpu_suite.sh args` with PYTHON set, as `make gpu` runs it; $OUT set to
    `out` (the device machine's returned folder) or unset."""
    env = {**os.environ, "PYTHON": python}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class SuiteRun:
    """A finished run of the GPU suite: its results folder, its bundle and its output."""

    results: Path
    bundle: Path
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory) -> Iterator[None]:
    """Point the TMPDIR of every command the tests start into pytest's own temporary tree, so
    what they leave in it (torchrun's torchelastic_* logs, the GPU suite's results folder when
    $OUT is set) goes with pytest's cleanup instead of piling up in /tmp. torch.compile's
    cache stays where it was: moving it would recompile every kernel in every run."""
    with pytest.MonkeyPatch.context() as patch:  # undone when the session ends
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # torch's default, named before TMPDIR
            patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir())
                                                         / f"torchinductor_{getpass.getuser()}"))
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        yield


@pytest.fixture(autouse=True)
def no_gpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch) -> None:
    """The commands a test starts see no GPU unless the test is marked `gpu`, so the CPU tests
    check the CPU's defaults and paths on any machine: on a GPU one, `make test` would have
    them pick bf16, compilation and the resident loader, and put two processes on one GPU."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def gpu_suite_dry_run(tmp_path_factory) -> SuiteRun:
    """The whole GPU suite on the CPU, once per session: every step's real commands with tiny
    sizes; its bench steps are plain `tools/bench.py --quick` runs, which test_bench reads."""
    results = tmp_path_factory.mktemp("gpu-results")
    bundle = tmp_path_factory.mktemp("gpu-bundle") / "suite.tar.gz"
    process = run_gpu_suite("all", "--dry-run", "--results", results, "--bundle", bundle)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return SuiteRun(results, bundle, process)


# Modules whose tests run on another module's pytest-xdist worker: both read the same
# session-scoped run (here the GPU suite's dry run, the slowest fixture of all), made once.
SAME_WORKER = {"tests/test_gpu_suite.py": "tests/test_bench.py"}
# Modules spread over the workers a test each, tests with the same parameters together: the
# GPU's end-to-end tests, tens of seconds each, where a parameter picks a module fixture's run
# (test_gpu's cuda_run per loader), made once per worker that needs it.
BY_PARAMETERS = {"tests/test_gpu.py"}


def worker_scope(nodeid: str) -> str:
    """The tests that share a pytest-xdist worker: by module, by SAME_WORKER, or in
    BY_PARAMETERS's modules by parameters (else by test)."""
    module, _, test = nodeid.partition("::")
    if module in BY_PARAMETERS:
        name, bracket, parameters = test.partition("[")
        return f"{module}::{'[' + parameters if bracket else name}"
    return SAME_WORKER.get(module, module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which plain pytest runs lack
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs the tests on one worker per core (pytest -n): whole modules to a
    worker (worker_scope), so that each module's shared runs (its module- and session-scoped
    fixtures) are made once."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ModuleScheduling(config, log)


# every core this machine lets the tests use, before pytest_configure gives a worker its share
MACHINE_CORES = sorted(os.sched_getaffinity(0))


def pytest_configure(config: pytest.Config) -> None:
    """Give each pytest-xdist worker cores of its own, for itself and the commands it starts:
    unpinned, N workers' torch processes each spread over every core, and their threads spin
    waiting for one another (more CPU for the same work). A worker is then a machine with
    fewer cores, which the code under test has to handle anyway."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return
    cores = MACHINE_CORES
    index, count = int(worker["workerid"].removeprefix("gw")), int(worker["workercount"])
    mine = set(cores[index % len(cores)::count])  # every core, none twice while there are enough
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked `gpu` where torch sees no CUDA device, so `-m gpu` runs anywhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: folder names count there
            item.add_marker(skip)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
SYNTHETIC_SIZE = (605, 201)  # odd sizes: two ranks need padding for training and split unevenly


# --- CIFAR python-format files ------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for the original CIFAR files: str and bytes as byte
    strings (BINSTRING), numpy under its numpy-1 module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_string


def numpy1_names(data: bytes) -> bytes:
    """A pickle as numpy 1 writes it: the numpy._core modules it names under their numpy 1
    names, numpy.core (numpy 2 renamed them), and without frames, which are optional and
    whose lengths the longer names would break."""
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    out = []
    for (op, arg, pos), end in zip(ops, ends, strict=True):
        raw = data[pos:end]
        if op.name == "FRAME":
            continue
        if op.name == "GLOBAL":  # protocols 0 to 3: "c<module>\n<name>\n"
            raw = raw.replace(b"cnumpy._core.", b"cnumpy.core.", 1)
        elif op.name == "SHORT_BINUNICODE" and arg.startswith("numpy._core."):  # 4 and 5
            name = arg.replace("numpy._core.", "numpy.core.", 1).encode()
            raw = pickle.SHORT_BINUNICODE + bytes([len(name)]) + name
        out.append(raw)
    return b"".join(out)


def dump_pickle(path: Path, obj, protocol: int | str = "py2", numpy1: bool = False) -> None:
    """Write obj as a pickle: "py2" like the original CIFAR files, or a Python 3 protocol;
    numpy's functions named as numpy 1 names them for "py2" and where numpy1 asks."""
    if protocol == "py2":
        buffer = io.BytesIO()
        _Py2Pickler(buffer, protocol=2).dump(obj)
        data, numpy1 = buffer.getvalue(), True
    else:
        data = pickle.dumps(obj, protocol=protocol)
    path.write_bytes(numpy1_names(data) if numpy1 else data)


def sidecar_info(path: Path) -> beton.BetonInfo | None:
    """The sidecar info of a usable .beton, or None (beton.sidecar_state without the reason)."""
    return beton.sidecar_state(path)[0]


def to_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 images as CIFAR rows: R, G and B planes of 1024 values each."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), layouts.ROW_SIZE))


def write_batch(path: Path, split: cifar.Split, protocol: int | str = "py2",
                py3: bool = False, numpy1: bool = False) -> None:
    """A CIFAR batch as the original archive has it, or (py3) as Python 3 code writes one:
    str keys and names, labels as a list of numpy integers; with numpy 1's names (numpy1)."""
    batch = {b"batch_label": b"testing", b"labels": split.labels.tolist(),
             b"data": to_rows(split.images),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(split.labels))]}
    if py3:
        batch = {"batch_label": "testing", "labels": list(split.labels),
                 "data": batch[b"data"], "filenames": [f.decode() for f in batch[b"filenames"]]}
    dump_pickle(path, batch, protocol, numpy1)


def random_split(n: int, rng: np.random.Generator, num_classes: int = 10) -> cifar.Split:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return cifar.Split(images, rng.integers(0, num_classes, size=n).astype(np.int64))


def ramp_split(n: int, rng: np.random.Generator) -> cifar.Split:
    """n images that show where each pixel came from: red grows with the column and green with
    the row, 8 levels a step (the same in every image), blue is noise."""
    steps = 4 + 8 * np.arange(32, dtype=np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = steps[None, None, :], steps[None, :, None]
    return cifar.Split(images, rng.integers(0, 10, n).astype(np.int64))


@dataclass
class Cifar10Dir:
    """A data dir holding cifar-10-batches-py/ and what its files contain."""

    data_dir: Path
    folder: Path
    train: cifar.Split
    test: cifar.Split

    def betons(self) -> list[Path]:
        return sorted(self.data_dir.glob("*.beton"))


def write_cifar10(data_dir: Path, rows=(3, 2, 4, 1, 2), n_test: int = 5, seed: int = 0,
                  protocol: int | str = "py2", py3: bool = False, numpy1: bool = False,
                  make_split: Callable[[int, np.random.Generator], cifar.Split] = random_split
                  ) -> Cifar10Dir:
    """A small CIFAR-10 python folder with `rows[i]` images in data_batch_{i+1}, each split
    made by `make_split`; py3 writes it as Python 3 code would, with numpy 1 where numpy1
    says (see write_batch)."""
    layout = layouts.LAYOUTS["cifar10"]
    folder = data_dir / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    parts = [make_split(n, rng) for n in rows]
    for name, part in zip(layout.train_files, parts, strict=True):
        write_batch(folder / name, part, protocol, py3, numpy1)
    test = make_split(n_test, rng)
    write_batch(folder / "test_batch", test, protocol, py3, numpy1)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    if py3:
        meta = {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    dump_pickle(folder / layout.meta_file, meta, protocol)
    train = cifar.Split(np.concatenate([p.images for p in parts]),
                        np.concatenate([p.labels for p in parts]))
    return Cifar10Dir(data_dir, folder, train, test)


@pytest.fixture
def cifar10_dir(tmp_path) -> Cifar10Dir:
    return write_cifar10(tmp_path / "data")


def synthetic_boxes(folder: Path) -> np.ndarray:
    """The object boxes (y0, x0, y1, x1) of a synthetic folder's test split, in test order:
    stored beside the images for the tests of Grad-CAM, which the readers ignore."""
    (test_file,) = layouts.OWN_LAYOUT.test_files
    return np.asarray(pickle.loads((folder / test_file).read_bytes())[b"boxes"])


def make_tar_gz(path: Path, folder: Path | None = None,
                members: list[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    """A tar.gz holding `folder` under its own name, plus hand-made members."""
    with tarfile.open(path, "w:gz") as tar:
        if folder is not None:
            tar.add(folder, arcname=folder.name)
        for info, data in members:
            if data:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


FOLDER_CLASSES = ["cat", "dog", "frog"]


def write_tree(root: Path, per_class: tuple[int, int] = (6, 3), seed: int = 0) -> dict:
    """An image folder (--dataset folder) of FOLDER_CLASSES: PNG files of random 32x32
    images, {split: (images, labels)} in sorted-file order."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in zip(folders.SPLITS, per_class, strict=True):
        images, labels = [], []
        for label, name in enumerate(FOLDER_CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
                images.append(pixels)
                labels.append(label)
        made[split] = (np.stack(images), np.array(labels))
    return made


# --- a local HTTP server -----------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@dataclass
class Server:
    root: Path  # files placed here are served
    url: str


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 (port 0) serving tmp_path/www from a thread."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy in the environment must not intercept
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    # polled every 0.05 s, not serve_forever's 0.5: shutdown() waits for the next poll
    thread = threading.Thread(target=partial(server.serve_forever, poll_interval=0.05),
                              daemon=True)
    thread.start()
    yield Server(root, f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()
    thread.join()


def free_port() -> int:
    """A local port nothing listens on now (the system's pick of a free one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused."""
    return free_port()


# --- prepared .beton files and loaders -----------------------------------------------------


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Prepared:
    """The synthetic dataset (605 train / 201 test) converted to .beton files once."""
    return prepare("synthetic", tmp_path_factory.mktemp("synthetic"),
                   synthetic_size=SYNTHETIC_SIZE, workers=1)


@pytest.fixture(scope="session")
def source(prepared) -> cifar.CifarData:
    """What the prepared .beton files were made from."""
    return cifar.read_folder(prepared.source, layouts.OWN_LAYOUT, "synthetic")


def cutout_centres(out: torch.Tensor, x: torch.Tensor, size: int,
                   atol: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre row and column of the cutout hole in each of N x C x H x W images `out`,
    after checking that each is its image of x (which holds no zero pixel) with one size x size
    square of zeros (every channel of its pixels), clipped at the border around a centre inside
    the image, and nothing else changed (within atol)."""
    hole = out == 0
    assert torch.equal(hole.all(1), hole.any(1))  # every channel of a pixel, or none
    assert ((out - x).abs() <= atol)[~hole].all()  # nothing else changes
    hole = hole[:, 0]
    rows, cols = hole.any(2), hole.any(1)
    assert torch.equal(hole, rows[:, :, None] & cols[:, None, :])  # a rectangle
    lines = torch.cat([rows, cols])  # each image's rows in the hole, then its columns
    count, end = lines.sum(1), lines.shape[1] - 1
    first, last = lines.int().argmax(1), end - lines.flip(1).int().argmax(1)
    assert (count > 0).all() and (count == last - first + 1).all()  # contiguous, never empty
    inner = (first > 0) & (last < end)
    assert (count[inner] == size).all()
    # clipped at the border: the centre still lies inside the image
    assert ((size - size // 2 <= count[~inner]) & (count[~inner] <= size)).all()
    top = torch.where(first > 0, first, last - size + 1)  # clipped on one side at most
    return (top + size // 2).split(len(out))


def flips_and_shifts(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flipped, row shift, column shift) of each augmented ramp_split image, however it was
    normalized: the 28 x 28 middle, which no shift of 2 or less pads, holds 32 distinct reds
    and greens, each one source column or row in the order of their values."""
    middle = images.float()[:, :2, 2:30, 2:30]
    red, green = middle[:, 0, 14].contiguous(), middle[:, 1, :, 14].contiguous()  # a row, a column
    cols = torch.searchsorted(torch.unique(middle[:, 0]), red)
    rows = torch.searchsorted(torch.unique(middle[:, 1]), green)
    flipped = cols[:, 1] < cols[:, 0]
    # every pixel moved as a whole: consecutive columns (reversed if flipped), rows in order
    assert (cols.diff() == torch.where(flipped, -1, 1)[:, None]).all() and (rows.diff() == 1).all()
    return flipped, rows[:, 0] - 2, torch.where(flipped, 29 - cols[:, 0], cols[:, 0] - 2)


def check_the_lineup(tmp_path: Path, device: torch.device, drain: Callable) -> None:
    """A fair lineup (tools/bench_peers.lineup) on `device`: every loader hands over the whole
    split in batches of the run's size, in the dtype its row compares (airbench's fp16, else
    the training dtype), flipping about half its images and shifting them by up to 2 pixels
    each way (peers too: their figures would otherwise time less work), each of ours as its
    row names, and the seed's peer is the torchvision DataLoader."""
    from engine.config import TrainConfig
    from tools import bench_peers

    made = write_cifar10(tmp_path / "data", rows=(26,) * 5, make_split=ramp_split)
    data = prepare("cifar10", made.data_dir, workers=1)
    cfg = TrainConfig(batch_size=64, precision="bf16", workers=1)
    rows = bench_peers.lineup(data, cfg, device, tmp_path)
    assert [row.augment for row, _ in rows] == ["flip, translate 2 reflect"] * 3 + [
        "flip, translate 2 zeros"] * 3 + ["flip, translate 2 reflect"] * 3
    kinds = []
    for index, (row, make) in enumerate(rows):
        loader = make()
        kinds.append(type(loader).__name__)
        batches = drain(loader)
        assert len(batches[0][0]) == 64 and sum(len(labels) for _, labels in batches) == 130
        dtype = "float16" if index < 2 else "bfloat16"
        assert bench_peers.describe(batches[0][0]).startswith(f"{dtype} 3x32x32"), row
        assert batches[0][0].device.type == device.type, row
        flipped, dy, dx = flips_and_shifts(torch.cat([images for images, _ in batches]))
        assert 0.3 < flipped.float().mean() < 0.7, row  # 4.5 standard deviations
        assert set(dy.tolist()) == set(dx.tolist()) == set(range(-2, 3)), row
        if row.role == "ours":
            augment = loader.augment.cfg
            assert row.augment == (f"flip, translate {augment.translate} "
                                   f"{'reflect' if augment.reflect else 'zeros'}")
    assert kinds[6] == "TorchvisionLoader"  # the seed's peer


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


@pytest.fixture(scope="session")
def drain():
    """drain(iterable, timeout=60): a copy of every item, or a test failure instead of a hang.

    FFCV reuses its output buffers, so items are copied as they arrive.
    """

    def run(iterable, timeout: float = 60.0) -> list:
        done: queue.Queue = queue.Queue()

        def consume():
            try:
                done.put([tuple(_copy(x) for x in item) for item in iterable])
            except BaseException as error:  # handed to the test below
                done.put(error)

        threading.Thread(target=consume, daemon=True).start()
        try:
            result = done.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"iterating {iterable!r} did not finish within {timeout} s")
        if isinstance(result, BaseException):
            raise result
        return result

    return run


# --- a tiny trained model ------------------------------------------------------------------


def train_tiny(base: Path, width: int = 8, epochs: int = 1,
               size: tuple[int, int] = (2000, 300)) -> Path:
    """A small synthetic run (default: 1 epoch of width 8 on 2000 images) in base/run, its data
    in base/data; never compiled (the CPU's default; on a GPU, compiling would take longer
    than the run itself)."""
    result = run_script(
        "engine/train.py", "--dataset", "synthetic", "--synthetic-size", *size,
        "--data-dir", base / "data", "--width", width, "--epochs", epochs, "--batch-size", "128",
        "--loader", "resident", "--no-compile", "--out", base / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"


def overwrite_middle(path: Path) -> None:
    """16 of the file's middle bytes overwritten: its size holds, only a hash tells."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xa5" * 16)


def overwritten_copy(recorded: Path, folder: Path) -> Path:
    """A copy of the .beton `recorded` and its sidecar in folder, then overwrite_middle'd: the
    size its sidecar records still holds, only the hash tells."""
    damaged = folder / recorded.name
    shutil.copyfile(recorded, damaged)
    shutil.copyfile(beton.sidecar(recorded), beton.sidecar(damaged))
    overwrite_middle(damaged)
    return damaged


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """train_tiny's run, made once for every module that only reads it (test_report.py has
    its own, larger one)."""
    return train_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ckpt(run_dir) -> dict:
    from engine import checkpoint

    return checkpoint.load(run_dir / "ckpt.pt")


# --- faults a test provokes ------------------------------------------------------------------


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `mount` (e.g. "size=4m", "ro,size=1m") for the block; the test is
    skipped where mounting is not allowed (not root)."""
    mount.mkdir(exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def without_root_powers(command: list) -> list:
    """`command` run as a user meets a folder it may not read: for root, with the two
    capabilities that let it read any folder (DAC_OVERRIDE, DAC_READ_SEARCH) dropped."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to take root's power to read any folder")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes, by relative path: to show
    that a failed command left a folder exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def file_identities(paths) -> list[tuple[int, int]]:
    """(inode, modification time) of each path: a file reused keeps both, one written again
    changes them even with the same bytes (written in place, or renamed over it), which is
    how a test tells a cache hit from a conversion that gave the same result."""
    return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


class SignalsWhenCollected:
    """Sends this process SIGTERM from its __del__: a stop signal whose KeyboardInterrupt,
    raised in a finalizer, Python prints and drops."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside __del__


def cpu_out_of_memory() -> None:
    """A real failed allocation: the CPU allocator's RuntimeError for 4 TiB."""
    torch.empty(1 << 40)


def cuda_out_of_memory() -> None:
    """What the CUDA caching allocator raises when it fails, made here: a failure of its own
    cannot be had on a machine with no GPU, nor safely on a shared one."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: a read-only tmpfs for root (who ignores modes),
    mode 0555 otherwise."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        with tmpfs(folder, "ro,size=1m"):
            yield folder
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


# python -c this script args: engine/train.py args, which sends itself a Ctrl-C as soon as its
# first epoch's files are written (on the epoch writer's thread, while epoch 2 trains)
CTRL_C_AFTER_FIRST_EPOCH = """
import os, runpy, signal, sys
from engine import checkpoint
signal.signal(signal.SIGINT, signal.default_int_handler)  # a command typed at a terminal
write = checkpoint.write_epoch
def write_then_interrupt(out, ckpt, best):
    write(out, ckpt, best)
    if ckpt["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGINT)
checkpoint.write_epoch = write_then_interrupt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def interrupt_after_first_epoch(args: list, out: Path) -> tuple[int, str]:
    """`engine/train.py *args --out out`, stopped by a Ctrl-C once its first epoch is saved;
    (exit code, stderr). The run sends the signal itself: one sent by the test after seeing
    the files could come epochs late on a loaded host, or after the run had ended."""
    result = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_FIRST_EPOCH,
                             str(ROOT / "engine" / "train.py"), *map(str, args), "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stderr

"""Guards around FFCV 1.0.2: its import resets torch's thread count, spends seconds in a JIT
compile it does not need and, on one core, starts numba threads that hang the process at exit;
more workers than numba may start is a numba traceback; a failure in its pipeline thread leaves
the consumer waiting forever, and so does a dead DatasetWriter worker; a process that ends while
that thread compiles crashes. All are put right here, on demand."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import os
import queue
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from common.errors import DataError, LoaderError, SetupError, one_line
from common.hardware import available_cores, positive_count
from common.stop_signals import STOP_SIGNALS, exit_at_once_on_ctrl_c, stop_signals_held
from common.torch_environment import address_space_problem

WRITE_TIMEOUT = 5.0  # seconds the writer waits for its workers once one has died
LLVM_EXIT_WAIT = 30.0  # seconds an exit waits for another thread's LLVM call (one call: less)
NUMBA_LAYERS = ("tbb", "omp", "workqueue")  # numba's threading layers


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards: FFCV's import sets it to 1
    (ffcv/pipeline/compiler.py), which would make CPU training silently single-threaded."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def importing_ffcv() -> Iterator[None]:
    """Import FFCV inside this. Besides keeping torch's threads (torch_threads_kept), it
    - spares each process a JIT compile, 5 s or more on 2 cores (benchmarks/results/
      ffcv-import-cpu-2core.log: reading a .beton through FFCV, as it was then read, means of
      9.2 s before, 3.7 s after): at import,
      ffcv/fields/rgb_image.py builds IMAGE_MODES, two constants that only Python code reads,
      as a numba typed Dict, which compiles the typed dict's methods. During FFCV's first
      import `numba.typed.Dict` is a plain dict (ffcv/memory_managers/base.py, the one other
      module importing it, never calls it); numba's own is restored afterwards.
    - keeps a process that may use one core from hanging at exit: FFCV's import starts
      numba's threads, and TBB, numba's first choice, starts no worker there and then waits
      forever in its unload (numba#10556, oneTBB#2056). There numba prefers OpenMP, unless
      NUMBA_THREADING_LAYER(_PRIORITY) says otherwise.
    - silences numba's warning, as the threads start, that a system TBB older than 2021.6
      (Ubuntu 22.04's, which opencv brings) cannot be its threading layer: numba then takes the
      next layer, and the warning's two lines came before every command's own.
    An ImportError in the block (FFCV's, or of a library it loads) is a SetupError naming what
    to install, or the address-space limit a library did not fit under: a traceback otherwise."""
    numba_settings_checked()
    import numba.typed

    patch = "ffcv" not in sys.modules
    if patch:
        numba.typed.Dict = dict  # the module's lazy __getattr__ serves Dict while this is unset
        chosen = {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ)
        if available_cores() == 1 and not chosen:
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    try:
        with torch_threads_kept(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The TBB threading layer requires TBB version",
                                    numba.NumbaWarning)
            yield
    except ImportError as error:
        if problem := address_space_problem(error, "FFCV"):  # not a missing library
            raise SetupError(problem) from None
        raise SetupError(
            f"FFCV cannot be imported ({one_line(error)}); install the system libraries it is "
            "built against (apt-get install libopencv-dev libturbojpeg0-dev pkg-config) and "
            "the project's Python packages: `rm .venv/.installed; make setup` does both."
        ) from error
    finally:
        if patch:
            del numba.typed.Dict


def numba_settings_checked() -> None:
    """Refuse numba's thread settings it would fail on, each a traceback otherwise: a
    NUMBA_NUM_THREADS that is no count of threads (read as numba is imported: below 1, an error
    inside that import; unreadable, numba's warning with a traceback in it, then every core
    anyway), and a threading layer, or an order of them, that numba does not know (read as its
    threads start, in FFCV's first epoch)."""
    value = os.environ.get("NUMBA_NUM_THREADS")
    if value is not None and positive_count(value) is None:
        raise SetupError(f"NUMBA_NUM_THREADS={value!r} is not a number of threads: numba (FFCV's "
                         "compiler) needs a whole number of at least 1; unset it (`unset "
                         "NUMBA_NUM_THREADS`) for as many as this process may use.")
    layer = os.environ.get("NUMBA_THREADING_LAYER")
    if layer is not None and layer not in ("default", "safe", "threadsafe", "forksafe",
                                           *NUMBA_LAYERS):
        raise SetupError(f"NUMBA_THREADING_LAYER={layer!r} is no threading layer numba (FFCV's "
                         f"compiler) knows: choose one of {', '.join(NUMBA_LAYERS)}, or default, "
                         "safe, threadsafe or forksafe; or unset it.")
    order = os.environ.get("NUMBA_THREADING_LAYER_PRIORITY")
    if order is not None and sorted(order.split()) != sorted(NUMBA_LAYERS):
        raise SetupError(f"NUMBA_THREADING_LAYER_PRIORITY={order!r} is not an order of numba's "
                         f"three threading layers: name each of {', '.join(NUMBA_LAYERS)} once, "
                         "separated by spaces; or unset it.")


def numba_workers(workers: int | None, default: int) -> int:
    """The workers of an FFCV Loader, which are numba threads: `workers` as asked, where more
    than numba may start is one LoaderError naming the limit (numba's own error would be a
    traceback); none asked, `default` up to that limit (a NUMBA_NUM_THREADS below it)."""
    import numba

    threads = numba.config.NUMBA_NUM_THREADS
    if workers is None:
        return min(default, threads)
    if workers > threads:
        raise LoaderError(
            f"--workers {workers}: FFCV's workers are numba threads, and numba may start "
            f"{threads} here (NUMBA_NUM_THREADS, by default the cores this process may use); "
            f"pass --workers {threads} or fewer.")
    return workers


def _record_pipeline_failure(args: threading.ExceptHookArgs, previous) -> None:
    """A dying EpochIterator keeps its consumer waiting forever on a queue; instead record the
    error and wake the consumer with FFCV's end-of-epoch marker, so `guarded` can raise."""
    from ffcv.loader.epoch_iterator import EpochIterator

    thread = args.thread
    if isinstance(thread, EpochIterator):
        thread.failure = args.exc_value
        thread.output_queue.put(None)
    else:
        previous(args)


def install_failure_hook() -> None:
    """Chain our hook in front of threading.excepthook, once per process."""
    if getattr(threading.excepthook, "cifar10_engine", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        _record_pipeline_failure(args, previous)

    hook.cifar10_engine = True
    threading.excepthook = hook


def _hold_llvm() -> None:
    """At exit: take llvmlite's lock, which every LLVM call takes, and keep it.

    An FFCV pipeline thread still compiling its Loader's first epoch (left by a Ctrl-C or an
    error) then stops at its next LLVM call; it went on in LLVM, without the GIL, while the
    process tore LLVM down: a segfault or an LLVM assertion instead of the command's own exit
    (benchmarks/results/ffcv-stop-during-jit-cpu-2core.log). The exit waits for the call in
    progress only, and not at all for a lock this thread holds (it is reentrant).
    """
    from llvmlite.binding import ffi

    exit_at_once_on_ctrl_c()  # the process is leaving: a Ctrl-C meanwhile ends it silently
    ffi.lib._lock._lock.acquire(timeout=LLVM_EXIT_WAIT)  # the RLock, without numba's event hooks


def guarded(loader: Iterable[tuple]) -> Iterator[tuple]:
    """Iterate an FFCV Loader, raising LoaderError when its pipeline thread fails; an epoch
    left early (Ctrl-C, an error, a break) tells that thread to stop."""
    install_failure_hook()
    atexit.unregister(_hold_llvm)  # once, and before the exit callbacks registered earlier
    atexit.register(_hold_llvm)
    with torch_threads_kept():  # each epoch's iter() sets torch's threads to its workers
        epoch = iter(loader)
    try:
        yield from epoch
    finally:
        epoch.close()  # FFCV's own: its thread returns at its next put into a full queue
    failure = getattr(epoch, "failure", None)
    if failure is not None:
        raise LoaderError(f"FFCV's pipeline failed while reading {loader.reader.file_name}: "
                          f"{one_line(failure)}") from failure


def _quiet_worker(errors: multiprocessing.queues.Queue, work: Callable[..., None],
                  *args: object) -> None:
    """A writer worker that ignores Ctrl-C, SIGTERM and SIGHUP, which a terminal, `timeout` or
    Slurm send to the whole group (the parent stops it; it starts with them held, so none arrives
    before), and reports its failure to the parent as one line instead of a traceback."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    try:
        work(*args)
    except BaseException as error:  # noqa: BLE001 - everything goes to the parent
        errors.put(one_line(error))
        sys.exit(1)


class _Sender:
    """The `put` FFCV's writer worker calls to report its allocations, sent over a pipe."""

    def __init__(self, connection: multiprocessing.connection.Connection):
        self.connection = connection

    def put(self, allocations: list) -> None:
        self.connection.send(allocations)


def guarded_writer(writer_class: type) -> type:
    """FFCV 1.0.2's DatasetWriter with its worker loop made failure-proof.

    Stock FFCV waits until its workers report every sample done, so a worker that dies
    (disk full, a failing sample, the OOM killer) makes it wait forever and leaks its shared
    memory. This subclass repeats its _write_common, but hears of a worker's death at once,
    stops the others on any failure or Ctrl-C, and always frees the shared memory.
    """
    import ctypes

    from ffcv.memory_allocator import MemoryAllocator

    class GuardedWriter(writer_class):
        def _write_common(self, num_samples: int, queue_content: Iterable,
                          work_fn: Callable[..., None], extra_worker_args: tuple) -> None:
            """FFCV's _write_common, with the workers watched and always cleaned up."""
            self.num_samples = num_samples
            self.prepare()
            context = multiprocessing.get_context("fork")  # workers share the dataset
            work, errors = context.Queue(), context.Queue()
            processes, results = [], []
            try:
                # Held while the queue is filled (an interrupt inside put() would keep its
                # lock, and close() below would then wait for it forever) and across the forks
                # (a worker starts with them held, then ignores them; and none is lost in a
                # fork hook, where Python drops a handler's exception).
                with stop_signals_held():
                    for todo in queue_content:
                        work.put(todo)
                    for _ in range(self.num_workers):
                        work.put(None)
                    done = context.Value(ctypes.c_uint64, 0)
                    allocator = MemoryAllocator(self.fname, self.data_region_start,
                                                self.page_size)
                    for _ in range(self.num_workers):
                        # One pipe per worker, whose sending end only that worker holds: its
                        # death then reads as end-of-file here, even halfway through a message.
                        receive, send = context.Pipe(duplex=False)
                        args = (work, self.metadata_sm, self.metadata_type, self.fields,
                                allocator, done, _Sender(send), *extra_worker_args)
                        process = context.Process(target=_quiet_worker,
                                                  args=(errors, work_fn, *args))
                        process.start()
                        processes.append(process)
                        send.close()
                        results.append(receive)
                allocations = self._collect(dict(zip(results, processes, strict=True)), errors)
                for p in processes:
                    p.join(WRITE_TIMEOUT)
                if done.value != num_samples:
                    raise DataError(f"the writer wrote {done.value} of {num_samples} "
                                    "samples")
                self.finalize(allocations)
            finally:
                with stop_signals_held():  # a second signal here would skip what follows
                    for q in (work, errors):  # never block exit on a dead reader
                        q.cancel_join_thread()
                    for p in processes:
                        if p.is_alive():
                            p.kill()
                        p.join(WRITE_TIMEOUT)
                    for connection in results:
                        connection.close()
                    for q in (work, errors):
                        q.close()
                    self.metadata_sm.close()
                    self.metadata_sm.unlink()

        def _collect(self, pending: dict, errors: multiprocessing.queues.Queue) -> list:
            """Every worker's page allocations; the first worker to die instead raises."""
            allocations = []
            while pending:
                for receive in multiprocessing.connection.wait(list(pending)):
                    process = pending.pop(receive)
                    try:
                        allocations.extend(receive.recv())
                    except (EOFError, OSError):  # it died before or while sending
                        process.join(WRITE_TIMEOUT)
                        raise DataError(self._failure(process, errors)) from None
            return allocations

        def _failure(self, process: multiprocessing.process.BaseProcess,
                     errors: multiprocessing.queues.Queue) -> str:
            """The one-line reason a worker stopped: its own message, its signal or status, or
            that it ended (or closed its pipe) without reporting its allocations."""
            try:
                reason = errors.get(timeout=1.0)
            except queue.Empty:  # killed by a signal, or ended quietly: nothing was sent
                code = process.exitcode
                reason = ("it ended without reporting its allocations" if not code
                          else f"killed by {signal.Signals(-code).name}" if code < 0
                          else f"exit status {code}")
            return f"a worker failed ({reason})"  # beton.write names the file

    return GuardedWriter

"""Guards around FFCV 1.0.2: its import resets torch's thread count, a failure in its
pipeline thread leaves the consumer waiting forever, and so does a dead DatasetWriter worker.
All are put right here, on demand."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from common.errors import DataError, LoaderError

WRITE_TIMEOUT = 5.0  # seconds the writer waits for its workers once one has died


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards: FFCV's import sets it to 1
    (ffcv/pipeline/compiler.py), which would make CPU training silently single-threaded."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def guarded(loader) -> Iterator[tuple]:
    """Iterate an FFCV Loader, raising LoaderError when its pipeline thread fails."""
    install_failure_hook()
    epoch = iter(loader)
    yield from epoch
    failure = getattr(epoch, "failure", None)
    if failure is not None:
        raise LoaderError(f"FFCV's pipeline failed while reading {loader.reader.file_name}: "
                          f"{type(failure).__name__}: {failure}") from failure


def _quiet_worker(errors: multiprocessing.queues.Queue, work: Callable[..., None],
                  *args: object) -> None:
    """A writer worker that ignores Ctrl-C (the parent stops it) and reports its failure to
    the parent as one line instead of printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        work(*args)
    except BaseException as error:  # noqa: BLE001 - everything goes to the parent
        errors.put(f"{type(error).__name__}: {error}")
        sys.exit(1)


def guarded_writer(writer_class: type) -> type:
    """FFCV 1.0.2's DatasetWriter with its worker loop made failure-proof.

    Stock FFCV waits until its workers report every sample done, so a worker that dies
    (disk full, a failing sample) makes it wait forever and leaks its shared memory. This
    subclass repeats its _write_common, but polls the workers, stops them on any failure
    or Ctrl-C, and always frees the shared memory.
    """
    import ctypes

    from ffcv.memory_allocator import MemoryAllocator

    class GuardedWriter(writer_class):
        def _write_common(self, num_samples: int, queue_content: Iterable,
                          work_fn: Callable[..., None], extra_worker_args: tuple) -> None:
            """FFCV's _write_common, with the workers polled and always cleaned up."""
            self.num_samples = num_samples
            self.prepare()
            context = multiprocessing.get_context("fork")  # workers share the dataset
            work, allocations, errors = context.Queue(), context.Queue(), context.Queue()
            processes = []
            try:
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)
                done = context.Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator,
                        done, allocations, *extra_worker_args)
                processes = [context.Process(target=_quiet_worker, args=(errors, work_fn, *args))
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                allocation_list = []
                while len(allocation_list) < len(processes):
                    try:
                        allocation_list.append(allocations.get(timeout=0.1))
                        continue
                    except queue.Empty:  # nothing yet: see whether anyone is still working
                        pass
                    failed = [p for p in processes if p.exitcode not in (None, 0)]
                    if failed:
                        raise DataError(self._failure(failed[0], errors))
                    if all(p.exitcode == 0 for p in processes):  # ended, yet some never reported
                        raise DataError(f"the workers writing {self.fname} ended without "
                                        "reporting their allocations")
                for p in processes:
                    p.join(WRITE_TIMEOUT)
                if done.value != num_samples:
                    raise DataError(f"{self.fname}: the writer wrote {done.value} of "
                                    f"{num_samples} samples.")
                self.finalize([a for chunk in allocation_list for a in chunk])
            finally:
                for p in processes:
                    if p.is_alive():
                        p.kill()
                    p.join(WRITE_TIMEOUT)
                for q in (work, allocations, errors):  # never block exit on a dead reader
                    q.cancel_join_thread()
                    q.close()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _failure(self, process: multiprocessing.process.BaseProcess,
                     errors: multiprocessing.queues.Queue) -> str:
            """The one-line reason a worker died: its own message, or its signal or status."""
            try:
                reason = errors.get(timeout=1.0)
            except queue.Empty:  # killed by a signal: nothing was sent
                code = process.exitcode
                reason = (f"killed by {signal.Signals(-code).name}" if code < 0
                          else f"exit status {code}")
            return f"a worker writing {self.fname} failed ({reason})"

    return GuardedWriter

"""Guards around FFCV 1.0.2: its import resets torch's thread count, and a failure in its
pipeline thread leaves the consumer waiting forever. Both are put right here, on demand."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from common.errors import LoaderError


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

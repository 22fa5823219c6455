"""Each epoch's files written on a thread while the next epoch trains: on a GPU an epoch takes
about a second, and writing best.pt and ckpt.pt of a width-64 ResNet-18 (128 MiB) up to a tenth
of that (BENCHMARKS.md), time the GPU would otherwise sit idle. One writer thread, as PyTorch
Lightning's AsyncCheckpointIO has."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from common.stop_signals import stop_signals_held


class EpochWriter:
    """Runs one write at a time, in order, on its own thread. A write's error is raised by the
    next check(), submit() or wait(). Leaving the `with` block waits for the write in flight,
    whatever ends the block: a Ctrl-C (which Python delivers to the main thread only, never to
    the writer) leaves the last epoch's files whole, as the interrupt message says."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-writer")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Start write() once the previous write has finished (raising its error, if any)."""
        self.wait()
        # a Ctrl-C waits until the write is held to wait for: the first submit starts the
        # thread, which may run the write (and a stop it sends) before submit returns
        with stop_signals_held():
            self._pending = self._pool.submit(write)

    def check(self) -> None:
        """Raise the error of a write that has failed; return at once while one still runs."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Return once nothing is being written; raise the error of a write that failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> EpochWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        with stop_signals_held():  # a second Ctrl-C here would leave the message behind the files
            try:
                self.wait()
            finally:  # also a write submitted just as an interrupt arrived
                self._pool.shutdown(wait=True)

"""What a failed run's error means: a failed allocation (the batch or the model too large),
or another process of the run gone. The messages that say so live with the code that catches
them (engine.loop, the bench)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from common.errors import EngineError

# how a failed allocation reads when it is not a torch.OutOfMemoryError: the CPU allocator's,
# and cuBLAS's and cuDNN's when their workspace cannot be had on a full GPU (cuDNN 8's
# CUDNN_STATUS_ALLOC_FAILED; cuDNN 9's CUDNN_STATUS_INTERNAL_ERROR_{HOST,DEVICE}_ALLOCATION_FAILED)
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_ALLOC_FAILED", "ALLOCATION_FAILED")
# torch's words when no cuDNN engine could run a convolution ("FIND was ...", "GET was ..."):
# with autotuning, how a workspace that did not fit ends, since torch skips each engine whose
# allocation failed. An unsupported GPU or dtype ends in them too, so they mean memory only
# once the CUDA allocator has refused an allocation in this process.
NO_ENGINE = "unable to find an engine to execute this computation"


def cuda_allocation_refused() -> bool:
    """Whether the CUDA caching allocator has failed an allocation in this process."""
    return torch.cuda.is_initialized() and torch.cuda.memory_stats().get("num_ooms", 0) > 0


def out_of_memory(error: BaseException | None) -> bool:
    """Whether an error is, or was raised while handling, a failed allocation: CUDA's
    OutOfMemoryError, the RuntimeError of the CPU allocator or of a CUDA library, or either
    one wrapped (by torch.compile's backend, a DataLoader's pin-memory thread)."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or (
                isinstance(error, RuntimeError) and (
                    any(text in str(error) for text in OUT_OF_MEMORY)
                    or (NO_ENGINE in str(error) and cuda_allocation_refused()))):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def out_of_memory_as(refusal: EngineError) -> Iterator[None]:
    """Run the block, raising `refusal` (one line naming what to lower) where an allocation in
    it failed (out_of_memory, or numpy's MemoryError): none of those is an EngineError, so a
    command printed a traceback. An EngineError passes as it is: one raised while handling a
    failed allocation says more than this."""
    try:
        yield
    except EngineError:
        raise
    except Exception as error:
        if not (isinstance(error, MemoryError) or out_of_memory(error)):
            raise
        raise refusal from None


def peer_gone(error: BaseException) -> bool:
    """Whether a collective (a barrier, DDP's all-reduce) failed: in a run of several processes,
    because another one stopped first (gloo: 'Connection closed by peer'; NCCL raises
    DistBackendError), and that process's own message says why."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "gloo" in str(error))

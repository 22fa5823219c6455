"""Which samples a rank visits in an epoch: the same rule for every loader."""

from __future__ import annotations

import torch

from loaders.augment import epoch_generator


def epoch_indices(n: int, *, epoch: int, seed: int, shuffle: bool, rank: int = 0,
                  world_size: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's sample indices for one epoch, on `device`.

    Training (shuffle=True): one permutation per (seed, epoch), identical on every rank, padded
    by wrapping around to a multiple of world_size so all ranks take the same number of steps
    (as DistributedSampler does); `padding(n, world_size)` samples are seen twice.
    Evaluation (shuffle=False): sequential and unpadded, so nothing is counted twice; ranks
    differ by at most one sample. The permutation is drawn on the CPU whatever the device:
    CUDA's randperm gives another one for the same seed, and every loader must agree.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if not shuffle:
        return torch.arange(n, device=device)[rank::world_size]
    order = torch.randperm(n, generator=epoch_generator(seed, epoch, "cpu", stream=1))
    total = n + padding(n, world_size)
    order = order.repeat(-(-total // n))[:total]  # wrap as often as needed (n < world_size)
    return order[rank::world_size].to(device)


def padding(n: int, world_size: int) -> int:
    """How many training samples are repeated per epoch so that n splits evenly."""
    return -n % world_size

"""Sharding the calibration batches over the processes of a distributed job.

Every estimator sample is a sum over calibration batches, so ``N`` processes
can each take every ``N``-th batch (``rank, rank + N, …``) and add their
partial sums with one all-reduce. The random draws of a sample depend only
on ``(seed, sample, batch position)``, never on which process handles the
batch, so the traces equal those of one process up to the order of a
float64 sum.

The estimators receive a :class:`Shard` (plain data plus a sum callable) and
know nothing of ``torch.distributed``;
:func:`mmdet_hawq.api.dist.process_shard` builds the one of the current
mmengine process group.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import numpy as np
import torch

SumFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shard:
    """Which calibration batches this process handles, and how partial sums
    are added across processes.

    Attributes:
        rank (int): This process's index. Defaults to 0.
        world_size (int): Number of processes. Defaults to 1.
        sum_fn (Callable, optional): ``tensor → sum of that tensor over all
            processes`` (a new tensor, same on every process). Defaults to
            None (one process: the identity).
    """

    rank: int = 0
    world_size: int = 1
    sum_fn: Optional[SumFn] = None

    def positions(self, num_batches: int) -> List[int]:
        """Batch positions of this process: ``rank, rank + world_size, …``."""
        return list(range(self.rank, num_batches, self.world_size))

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial`` summed over all processes."""
        if self.sum_fn is None or self.world_size == 1:
            return partial
        return self.sum_fn(partial)


def batch_generator(seed: int,
                    sample: int,
                    position: int,
                    device: Union[str, torch.device] = 'cpu'
                    ) -> torch.Generator:
    """Generator of the draws of one (sample, batch position): the same in
    every process and on resume, on the same kind of device.

    Args:
        seed (int): The run's seed.
        sample (int): Index of the estimator sample.
        position (int): Position of the batch in the calibration set.
        device (str | torch.device): Where the draws are made (the
            weights' device). CPU and CUDA generators seeded alike give
            different streams. Defaults to 'cpu'.

    Returns:
        torch.Generator: A generator on ``device`` seeded from all three.
    """
    state = np.random.SeedSequence([int(seed), int(sample), int(position)])
    return torch.Generator(device=device).manual_seed(
        int(state.generate_state(1, np.uint64)[0] >> np.uint64(1)))

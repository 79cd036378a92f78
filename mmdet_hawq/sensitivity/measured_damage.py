"""Measured damage: the increase of a loss when a group of quantizers is on.

The averaged-trace model predicts a perturbation's damage as trace × squared
error, a second-order expansion around the unperturbed point. It cannot see
what the expansion drops: the distillation loss's L1 box term has no
curvature (the Gauss–Newton draws see the class term only), and a range that
clips a tensor's tail (or its whole negative side) makes an error far beyond
the quadratic region. Measuring the loss with each group alone quantized
costs one forward pass per group and calibration batch, no backward.
"""
from typing import Callable, ContextManager, Dict, Mapping, Optional, Tuple

import torch

from .sharding import Shard

__all__ = ['measured_damage']


@torch.no_grad()
def measured_damage(loss: Callable[[int], torch.Tensor],
                    groups: Mapping[str, object],
                    quantized: Callable[[object], ContextManager[None]],
                    num_batches: int,
                    device: torch.device,
                    shard: Optional[Shard] = None
                    ) -> Tuple[Dict[str, float], float]:
    """``loss`` summed over the batches with each group's quantizers alone
    on, minus the sum with none.

    Args:
        loss (Callable): ``batch index → loss`` (a 0-d tensor on ``device``)
            of the model as it is when called.
        groups (Mapping[str, object]): Group name → what ``quantized``
            takes to switch that group's quantizers on.
        quantized (Callable): ``group → context manager`` inside which the
            model runs with that group quantized.
        num_batches (int): Batches ``loss`` takes.
        device (torch.device): Where the sums are kept.
        shard (Shard, optional): This process's batches and the sum over
            processes. Defaults to None (one process).

    Returns:
        tuple: Group name → measured damage (may be < 0 where quantizing
        happens to move the outputs towards the teacher), and the loss with
        no group quantized.
    """
    shard = shard or Shard()
    positions = shard.positions(num_batches)
    names = list(groups)
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    for i in positions:
        totals[0] += loss(i).detach().double()
    for k, name in enumerate(names, start=1):
        with quantized(groups[name]):
            for i in positions:
                totals[k] += loss(i).detach().double()
    totals = shard.sum(totals).cpu()
    base = float(totals[0])
    return {n: float(totals[k]) - base
            for k, n in enumerate(names, start=1)}, base

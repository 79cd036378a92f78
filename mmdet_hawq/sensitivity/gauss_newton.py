"""Gauss–Newton estimator of per-layer averaged traces (beyond the paper).

For a loss ``f(θ) = Σ_q ℓ_q(z_q(θ))`` whose output-space Hessians ``A_q`` are
positive semi-definite, the Gauss–Newton matrix ``G = Σ_q J_qᵀ A_q J_q`` can
be sampled without double backward: draw ``u_q`` with ``E[u_q u_qᵀ] = A_q``
independently per output, back-propagate ``s = Σ_q u_q·z_q`` once, and
``||∇_{θ_l} s||²`` is an unbiased, never negative estimate of ``tr(G_ll)``.
At a distillation student equal to its teacher the residual is zero, so
``G`` *is* the Hessian there.

The objective supplies ``sample_fn(batch, generator) → s``; batches are
independent, so squared norms are summed over batches (lower variance than
squaring the summed gradient, same expectation). Each (sample, batch) has
its own generator, so a :class:`~.sharding.Shard` of the batches in another
process draws the same ``u`` and the all-reduced sum equals one process's.

Everything runs on the weights' device: the draws come from a generator on
that device and the per-layer sums stay there, with one device-to-host copy
per sample (in :func:`.traces.sample_traces`). CPU and CUDA generators are
different streams, so the draws, and the traces, agree across devices in
distribution, not bit for bit.
"""
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..errors import HawqUserError
from .sharding import Shard, batch_generator
from .sampling import TraceResult, note_unused, sample_traces, start_result

SampleFn = Callable[[Any, torch.Generator], torch.Tensor]


def gauss_newton_traces(params: Mapping[str, torch.Tensor],
                        sample_fn: SampleFn,
                        batches: Sequence,
                        tol: float = 0.05,
                        min_samples: int = 10,
                        max_samples: int = 100,
                        seed: int = 0,
                        result: Optional[TraceResult] = None,
                        on_sample: Optional[Callable[[TraceResult],
                                                     None]] = None,
                        objective: str = '',
                        shard: Optional[Shard] = None) -> TraceResult:
    """Sample averaged per-layer Gauss–Newton traces until they converge.

    A weight that gets no gradient (``None``) has trace 0 and is listed in
    ``result.meta['no_gradient']``.

    Args:
        params (Mapping[str, Tensor]): Targeted weights by name.
        sample_fn (Callable): ``(batch, generator) → scalar`` whose gradient
            is one draw of ``Jᵀu`` for that batch.
        batches (Sequence): Calibration batches.
        tol (float): Relative SE target of every layer. Defaults to 0.05.
        min_samples (int): Fewest samples. Defaults to 10.
        max_samples (int): Most samples. Defaults to 100.
        seed (int): Seed of the output-space draws. Defaults to 0.
        result (TraceResult, optional): Samples to continue. Defaults to
            None.
        on_sample (Callable, optional): Called after each sample. Defaults
            to None.
        objective (str): Name recorded in the result. Defaults to ''.
        shard (Shard, optional): This process's share of the batches and
            the sum across processes. Defaults to None (one process).

    Returns:
        TraceResult: All samples.
    """
    if len(batches) == 0:
        raise HawqUserError(
            'the calibration set is empty: give at least one image '
            '(calibration num_images >= 1)')
    names = list(params)
    plist = [params[n] for n in names]
    result = start_result(result, names, [p.numel() for p in plist],
                          'gauss_newton', objective)
    shard = shard or Shard()
    positions = shard.positions(len(batches))
    device = plist[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)

    def sample_sums(index: int) -> torch.Tensor:
        sq = torch.zeros(len(plist), dtype=torch.float64, device=device)
        for pos in positions:
            s = sample_fn(batches[pos],
                          batch_generator(seed, index, pos, device))
            grads = torch.autograd.grad(s, plist, allow_unused=True)
            note_unused(result, names, grads)
            # ||g||² as one float32 dot product per weight (a float64 copy
            # of every gradient cost 2% of a sample on the small DINO), summed
            # over batches and samples in float64, on the device
            sq += torch.stack([zero if g is None else _squared_norm(g)
                               for g in grads])
        return sq

    return sample_traces(result, sample_sums, tol, min_samples, max_samples,
                         on_sample, shard)


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """``Σ grad²`` as a 0-d float64 tensor on the gradient's device (one
    fused float32 pass)."""
    flat = grad.detach().reshape(-1)
    return torch.dot(flat, flat).double()

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
"""
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..errors import HawqUserError
from .sharding import Shard, batch_generator
from .traces import TraceResult, check_finite, check_used, should_stop

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
    numels = [p.numel() for p in plist]
    if result is None:
        result = TraceResult(names, numels, estimator='gauss_newton',
                             objective=objective)
    elif result.names != names or result.estimator != 'gauss_newton':
        raise ValueError('the saved samples are of other layers or of '
                         'another estimator: start a new run')
    shard = shard or Shard()
    positions = shard.positions(len(batches))
    while not should_stop(result, tol, min_samples, max_samples):
        start = time.perf_counter()
        sq = torch.zeros(len(plist), dtype=torch.float64)
        for pos in positions:
            gen = batch_generator(seed, result.num_samples, pos)
            s = sample_fn(batches[pos], gen)
            grads = torch.autograd.grad(s, plist, allow_unused=True)
            check_used(names, grads, 'the output')
            sq += torch.stack([g.detach().double().pow(2).sum()
                               for g in grads]).cpu()
        total = shard.sum(sq)
        row = (total / torch.tensor(numels, dtype=torch.float64)).tolist()
        check_finite(row, names, 'a Gauss-Newton trace sample')
        result.samples.append(row)
        result.seconds += time.perf_counter() - start
        if on_sample is not None:
            on_sample(result)
    return result


def softmax_fisher_draw(logits: torch.Tensor, temperature: float,
                        weight: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u`` with ``E[u uᵀ] = weight · (diag(p) − p pᵀ) / T²``, ``p =
    softmax(logits / T)``: the output Hessian of a temperature KL term.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): Softmax temperature ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): CPU generator of the class draws.

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.softmax(logits.detach().double() / temperature, dim=-1)
    flat = p.reshape(-1, p.shape[-1]).cpu()
    idx = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    onehot = torch.zeros_like(flat).scatter_(1, idx[:, None], 1.0)
    u = (onehot - flat).reshape(p.shape) * (weight**0.5 / temperature)
    return u.to(logits.device, logits.dtype)

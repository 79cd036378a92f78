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
from .traces import TraceResult, note_unused, sample_traces, start_result

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


def softmax_fisher_draw(logits: torch.Tensor, temperature: float,
                        weight: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u`` with ``E[u uᵀ] = weight · (diag(p) − p pᵀ) / T²``, ``p =
    softmax(logits / T)``: the output Hessian of a temperature KL term.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): Softmax temperature ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the class draws, on the
            device of ``logits``.

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.softmax(logits.detach().double() / temperature, dim=-1)
    flat = p.reshape(-1, p.shape[-1])
    idx = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    onehot = torch.zeros_like(flat).scatter_(1, idx[:, None], 1.0)
    u = (onehot - flat).reshape(p.shape) * (weight**0.5 / temperature)
    return u.to(logits.dtype)


def sigmoid_fisher_draw(logits: torch.Tensor, temperature: float,
                        weight: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u`` with ``E[u uᵀ] = weight · diag(p (1 − p)) / T²``, ``p =
    σ(logits / T)``: the output Hessian of a per-class Bernoulli KL at
    temperature ``T`` at equality.

    The draw is ``u = ε · sqrt(weight · p (1 − p)) / T`` with Rademacher
    ``ε``: its second moment is exactly the diagonal (``u²`` has no
    variance), which gives lower-variance traces than ``(y − p)/T`` with
    ``y ~ Bernoulli(p)``.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): Temperature ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the signs, on the device
            of ``logits``.

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.sigmoid(logits.detach().double() / temperature)
    sign = torch.randint(0, 2, p.shape, generator=generator,
                         dtype=torch.int8, device=p.device).double() * 2 - 1
    u = sign * (weight * p * (1 - p)).sqrt() / temperature
    return u.to(logits.dtype)


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """``Σ grad²`` as a 0-d float64 tensor on the gradient's device (one
    fused float32 pass)."""
    flat = grad.detach().reshape(-1)
    return torch.dot(flat, flat).double()

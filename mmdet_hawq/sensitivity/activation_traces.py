"""Gauss–Newton traces of the output Hessian with respect to activations.

The weights' estimator (:mod:`.gauss_newton`) back-propagates
``s = Σ_q u_q·z_q`` with ``E[u_q u_qᵀ] = A_q``; the same backward passes
through every activation ``a``, and ``||∂s/∂a||²`` is an unbiased estimate of
``tr(J_aᵀ A J_a)``, the trace of the Gauss–Newton matrix with respect to
``a`` (the Hessian itself at a student equal to its teacher). Divided by the
elements of ``a`` per batch, it is the averaged trace that multiplies the
site's quantization error ``||Q(a) − a||²``, as the paper does for weights.

Which tensors are the sites is the caller's business: ``capture()`` is a
context manager that yields a list filled with ``(site, tensor)`` during the
forward inside it (:func:`~mmdet_hawq.quant.activations.captured_sites`).
"""
from typing import Any, Callable, ContextManager, List, Optional, Sequence

import torch

from ..errors import HawqUserError
from .sharding import Shard, batch_generator
from .sampling import TraceResult, sample_traces, start_result

Capture = Callable[[], ContextManager[List[tuple]]]


def activation_traces(capture: Capture,
                      names: Sequence[str],
                      sample_fn: Callable[[Any, torch.Generator],
                                          torch.Tensor],
                      num_batches: int,
                      device: torch.device,
                      tol: float = 0.05,
                      min_samples: int = 10,
                      max_samples: int = 100,
                      seed: int = 0,
                      result: Optional[TraceResult] = None,
                      shard: Optional[Shard] = None) -> TraceResult:
    """Sample averaged per-site Gauss–Newton traces until they converge.

    A site that a forward does not reach, or whose tensor the outputs do not
    depend on, has trace 0.

    Args:
        capture (Callable): ``capture()`` → context yielding the captured
            ``(site, tensor)`` list of the forward inside it.
        names (Sequence[str]): Site names, the result's columns.
        sample_fn (Callable): ``(batch index, generator) → scalar s`` (e.g.
            :meth:`~.objectives.DistillationObjective.gauss_newton_sample`).
        num_batches (int): Calibration batches.
        device (torch.device): Where the draws are made.
        tol (float): Relative SE target of every site. Defaults to 0.05.
        min_samples (int): Fewest samples. Defaults to 10.
        max_samples (int): Most samples. Defaults to 100.
        seed (int): Seed of the output-space draws. Defaults to 0.
        result (TraceResult, optional): Samples to continue.
        shard (Shard, optional): This process's share of the batches.

    Returns:
        TraceResult: ``numels`` are each site's elements per batch.
    """
    if num_batches == 0:
        raise HawqUserError(
            'the calibration set is empty: give at least one image '
            '(calibration num_images >= 1)')
    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    shard = shard or Shard()
    positions = shard.positions(num_batches)
    numels = [0] * len(names)

    def one(sample: int, pos: int, sq: torch.Tensor) -> None:
        with capture() as seen:
            s = sample_fn(pos, batch_generator(seed, sample, pos, device))
        seen = [(n, t) for n, t in seen if n in index]
        grads = torch.autograd.grad(s, [t for _, t in seen],
                                    allow_unused=True)
        for (name, t), g in zip(seen, grads):
            if g is not None:
                flat = g.detach().reshape(-1)
                sq[index[name]] += torch.dot(flat, flat).double()
        if not any(numels):
            for name, t in seen:
                numels[index[name]] += t.numel()

    def sample_sums(sample: int) -> torch.Tensor:
        sq = torch.zeros(len(names), dtype=torch.float64, device=device)
        for pos in positions:
            one(sample, pos, sq)
        return sq

    if result is None:
        # the elements per batch come from one forward (its sums are kept
        # as the first sample)
        first = torch.zeros(len(names), dtype=torch.float64, device=device)
        one(0, positions[0], first)
        for pos in positions[1:]:
            one(0, pos, first)
        result = start_result(None, names, [max(1, n) for n in numels],
                              'gauss_newton_activations', 'distillation')
        total = shard.sum(first).cpu()
        result.samples.append((total / torch.tensor(
            result.numels, dtype=torch.float64,
            device=total.device)).tolist())
    else:
        result = start_result(result, names, result.numels,
                              'gauss_newton_activations', 'distillation')
    return sample_traces(result, sample_sums, tol, min_samples, max_samples,
                         None, shard)

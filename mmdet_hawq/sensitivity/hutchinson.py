"""Hutchinson estimator of per-layer averaged Hessian traces (the paper's).

For a loss ``f`` averaged over a calibration set, one sample draws a Rademacher
vector ``v`` over all targeted weights, computes one Hessian-vector product
``Hv`` (double backward, accumulated batch by batch) and reads every layer's
estimate ``v_l·(Hv)_l / numel_l`` from it. Each is unbiased for ``tr(H_ll) /
numel_l``. The ``per_layer`` variant draws ``v`` non-zero on one layer at a
time (no cross-layer terms, ``L`` times the cost).

Each batch's ``v_l·(H_b v)_l`` is summed in float64; with a
:class:`~.sharding.Shard`, every process takes its share of the batches (same
``v``) and the partial sums are added by one all-reduce per sample. The probes
are drawn, and the sums kept, on the weights' device (one device-to-host copy
per sample); CPU and CUDA generators give different ±1 streams, so traces agree
across devices in distribution, not bit for bit.

Double backward runs with :func:`~.double_backward.double_backward_kernels`
(the math attention kernel, the gather-based deformable attention of
:mod:`.bilinear`), on any device. A weight that gets no gradient has trace 0
and is listed in ``result.meta['no_gradient']``. A loss that is not finite is
reported by the objective (:mod:`.objectives`, naming the batch and its
images), a trace that is not finite by the sampling loop
(:func:`.traces.check_finite`, naming the layers).

The function knows nothing of mmengine: it takes a name → parameter mapping, a
loss callable and a sequence of batches.
"""
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from ..errors import HawqUserError
from .double_backward import double_backward_kernels
from .sharding import Shard
from .sampling import TraceResult, sample_traces, start_result

LossFn = Callable[[Any], torch.Tensor]


def rademacher_like(params: Sequence[torch.Tensor],
                    generator: torch.Generator) -> List[torch.Tensor]:
    """One ±1 tensor per parameter, drawn on the parameters' device from
    ``generator`` (which lives there too)."""
    return [(torch.randint(0, 2, p.shape, generator=generator,
                           dtype=torch.int8, device=p.device) * 2 - 1).to(
                               p.dtype) for p in params]


def sample_generator(seed: int,
                     index: int,
                     device: Union[str, torch.device] = 'cpu'
                     ) -> torch.Generator:
    """Generator of sample ``index`` on ``device``: a resumed run on the
    same kind of device draws the same vectors (CPU and CUDA streams
    differ)."""
    return torch.Generator(device=device).manual_seed(
        int(seed) * 1_000_003 + int(index))


def batch_hvp(params: Sequence[torch.Tensor],
              loss_fn: LossFn,
              batch: Any,
              vectors: Sequence[torch.Tensor],
              names: Sequence[str],
              unused: Optional[List[str]] = None) -> List[torch.Tensor]:
    """``H_b v`` of one batch's loss by double backward.

    Args:
        params (Sequence[Tensor]): Weights, each with ``requires_grad``.
        loss_fn (Callable): ``batch → scalar`` share of the total loss.
        batch (Any): One calibration batch.
        vectors (Sequence[Tensor]): ``v``, one tensor per weight.
        names (Sequence[str]): Weight names.
        unused (list, optional): Names of weights without a gradient are
            appended here. Defaults to None.

    Returns:
        list[Tensor]: ``H_b v``, one tensor per weight (zeros for a weight
        the loss does not reach).
    """
    with double_backward_kernels():
        loss = loss_fn(batch)
        grads = torch.autograd.grad(
            loss, params, create_graph=True, allow_unused=True)
        if unused is not None:
            unused.extend(n for n, g in zip(names, grads)
                          if g is None and n not in unused)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors)
                  if g is not None and g.requires_grad)
        if not torch.is_tensor(dot) or not dot.requires_grad:
            return [torch.zeros_like(p) for p in params]  # linear: H = 0
        hvs = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h
            for p, h in zip(params, hvs)]


def batch_dots(params: Sequence[torch.Tensor],
               loss_fn: LossFn,
               batches: Sequence,
               positions: Sequence[int],
               vectors: Sequence[torch.Tensor],
               names: Sequence[str],
               layers: Optional[Sequence[int]] = None,
               unused: Optional[List[str]] = None) -> torch.Tensor:
    """``Σ_b v_l·(H_b v)_l`` over the batches at ``positions``, per layer.

    Args:
        params (Sequence[Tensor]): Weights, each with ``requires_grad``.
        loss_fn (Callable): ``batch → scalar`` share of the total loss.
        batches (Sequence): All calibration batches.
        positions (Sequence[int]): Which of them to use.
        vectors (Sequence[Tensor]): ``v``, one tensor per weight.
        names (Sequence[str]): Weight names for error messages.
        layers (Sequence[int], optional): Layers whose dot is read (others
            stay 0). Defaults to None (all).
        unused (list, optional): See :func:`batch_hvp`. Defaults to None.

    Returns:
        Tensor: float64, shape (L,).
    """
    dots = torch.zeros(len(params), dtype=torch.float64,
                       device=params[0].device)
    layers = list(range(len(params)) if layers is None else layers)
    for pos in positions:
        hv = batch_hvp(params, loss_fn, batches[pos], vectors, names, unused)
        dots[layers] += torch.stack(
            [(vectors[i] * hv[i]).double().sum() for i in layers])
    return dots


def hutchinson_traces(params: Mapping[str, torch.Tensor],
                      loss_fn: LossFn,
                      batches: Sequence,
                      tol: float = 0.05,
                      min_samples: int = 10,
                      max_samples: int = 100,
                      per_layer: bool = False,
                      seed: int = 0,
                      result: Optional[TraceResult] = None,
                      on_sample: Optional[Callable[[TraceResult],
                                                   None]] = None,
                      objective: str = '',
                      shard: Optional[Shard] = None) -> TraceResult:
    """Sample averaged per-layer Hessian traces until they converge.

    Args:
        params (Mapping[str, Tensor]): Targeted weights by name; gradients
            are taken with respect to these only.
        loss_fn (Callable): ``batch → scalar``; the sum over ``batches`` is
            the calibration-set loss.
        batches (Sequence): Calibration batches (iterated once per sample).
        tol (float): Stop when every layer's relative SE is below this.
            Defaults to 0.05.
        min_samples (int): Fewest samples. Defaults to 10.
        max_samples (int): Most samples. Defaults to 100.
        per_layer (bool): One Hessian-vector product per layer with ``v``
            non-zero on that layer only. Defaults to False.
        seed (int): Seed of the Rademacher vectors. Defaults to 0.
        result (TraceResult, optional): Samples of an interrupted run to
            continue. Defaults to None.
        on_sample (Callable, optional): Called with the result after each
            sample (e.g. to save it). Defaults to None.
        objective (str): Name recorded in the result. Defaults to ''.
        shard (Shard, optional): This process's share of the batches and
            the sum across processes. Defaults to None (one process).

    Returns:
        TraceResult: All samples; ``result.mean()`` is the trace estimate.
    """
    if len(batches) == 0:
        raise HawqUserError(
            'the calibration set is empty: give at least one image '
            '(calibration num_images >= 1)')
    names = list(params)
    plist = [params[n] for n in names]
    estimator = 'hutchinson_per_layer' if per_layer else 'hutchinson'
    result = start_result(result, names, [p.numel() for p in plist],
                          estimator, objective)
    unused = result.meta.setdefault('no_gradient', [])
    shard = shard or Shard()
    positions = shard.positions(len(batches))

    def sample_sums(index: int) -> torch.Tensor:
        vs = rademacher_like(plist,
                             sample_generator(seed, index, plist[0].device))
        if not per_layer:
            return batch_dots(plist, loss_fn, batches, positions, vs, names,
                              unused=unused)
        dots = torch.zeros(len(plist), dtype=torch.float64,
                           device=plist[0].device)
        for i in range(len(plist)):
            masked = [v if j == i else torch.zeros_like(v)
                      for j, v in enumerate(vs)]
            dots += batch_dots(plist, loss_fn, batches, positions, masked,
                               names, layers=[i], unused=unused)
        return dots

    return sample_traces(result, sample_sums, tol, min_samples, max_samples,
                         on_sample, shard)

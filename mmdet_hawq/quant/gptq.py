"""GPTQ second-order rounding on the paper's grid (Frantar et al., 2022).

The grid is the paper's Eq. 6 grid, unchanged: the scale is
``max|W| / (2^(b-1) - 1)`` of the float weight (per tensor, or per output
channel with ``axis=0``), computed before any update. Only the integer codes
differ from nearest rounding: GPTQ rounds the columns of ``W`` (out, in) one
after the other and spreads each column's rounding error over the columns not
yet rounded, so that the layer's output error ``||X Wᵀ − X Qᵀ||²`` on the
calibration inputs ``X`` (N, in) is small. It needs ``H = Xᵀ X`` (in, in)
per layer, accumulated from the layer's inputs with forward hooks
(:class:`~.gptq_inputs.HessianCollector`); memory is ``in × in`` per layer.

Which weights get GPTQ codes, their ``H`` and their forward order live in
:mod:`.gptq_inputs`.

:func:`gptq_apply` quantizes the weights a precision plan names, in forward
order, each with the ``H`` its inputs have once the earlier weights are
quantized (``sequential=True``), or all with the float model's ``H``.
"""
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Mapping, Optional, Sequence,
                    Union)

import torch
import torch.nn as nn

from .gptq_inputs import (ForwardFn, HessianCollector, call_sequence,
                          collect_hessians, eval_mode, first_call_order,
                          gptq_targets)
from .quantizer import (QuantizedWeight, choose_scale, named_weights, qmax,
                        quantize_weight)

Hessians = Union[torch.Tensor, Sequence[torch.Tensor]]


def _gptq_rows(weight: torch.Tensor, hessian: torch.Tensor,
               scale: torch.Tensor, limit: int, damp: float,
               act_order: bool, block_size: int,
               zero_dead: bool) -> torch.Tensor:
    """GPTQ codes of a 2-D weight with one Hessian (float64 inside).

    Args:
        weight (Tensor): (r, d) float weight.
        hessian (Tensor): (d, d) ``Xᵀ X`` of the inputs.
        scale (Tensor): 0-d, or (r, 1) per row.
        limit (int): Largest code, ``2^(b-1) - 1``.
        damp (float): Relative dampening of the diagonal.
        act_order (bool): Round columns by descending ``diag(H)``.
        block_size (int): Columns per lazy-update block.
        zero_dead (bool): Code 0 for columns whose input is always 0.

    Returns:
        Tensor: (r, d) float64 integer-valued codes.
    """
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    d = w.shape[1]
    s = scale.detach().to(device=w.device, dtype=torch.float64)
    s = s.reshape(-1) if s.dim() else s.expand(w.shape[0])
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    if zero_dead:
        w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = _inverse_cholesky_upper(h, damp)
    codes = torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            code = torch.round(col / s).clamp_(-limit, limit)
            codes[:, i1 + i] = code
            err = (col - code * s) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U``), float64.

    ``λ = damp · mean(diag(H))``; if ``H + λI`` is still not positive
    definite in floating point, ``λ`` grows tenfold, up to five times.

    Args:
        h (Tensor): (d, d) symmetric positive semi-definite, diagonal > 0.
        damp (float): Relative dampening.

    Returns:
        Tensor: (d, d) upper-triangular ``U``.
    """
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        lam = lam * 10 if lam > 0 else 1e-8 * mean_diag
    raise ValueError('the input Hessian is not positive definite even with '
                     f'dampening {float(lam / mean_diag):g} · mean(diag H)')


def gptq_quantize(weight: torch.Tensor,
                  hessian: Hessians,
                  bits: int,
                  axis: Optional[int] = None,
                  damp: float = 0.01,
                  act_order: bool = False,
                  block_size: int = 128,
                  zero_dead: bool = True) -> QuantizedWeight:
    """GPTQ codes of ``weight`` on the Eq. 6 grid of the float weight.

    The weight is viewed as (out, d) with ``d = numel / out`` (a conv's
    (out, in, kh, kw) in ``F.unfold``'s order). With ``G`` Hessians the rows
    are split into ``G`` equal blocks, block ``g`` rounded with
    ``hessian[g]`` (the q/k/v blocks of ``in_proj_weight``, the groups of a
    grouped conv); the scale is the whole weight's either way. Columns are
    rounded one by one (in order of descending ``diag(H)`` with
    ``act_order``); each column's error, divided by the diagonal of the
    upper Cholesky factor ``U`` of ``(H + λI)⁻¹``, is subtracted from the
    later columns along ``U``'s row — within a block of ``block_size``
    columns at once and from the columns after it when the block is done
    (Algorithm 1 of the GPTQ paper). ``λ = damp · mean(diag(H))``. An input
    that is always 0 (``H_jj = 0``) gets ``H_jj = 1`` and, as in GPTQ, its
    column the code 0 when ``zero_dead`` (else nearest rounding; its error
    is not spread either way, and neither changes the calibration outputs).

    Args:
        weight (Tensor): (out, d) or (out, ...) float weight.
        hessian (Tensor | Sequence[Tensor]): (d, d) ``Xᵀ X`` of the inputs,
            or one per row block.
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): 0 for one scale per output channel; None for
            per tensor (the paper). Defaults to None.
        damp (float): Relative dampening. Defaults to 0.01.
        act_order (bool): Round columns by descending ``diag(H)`` (the codes
            come back in the original order). Defaults to False.
        block_size (int): Columns per lazy-update block; any value gives
            the same codes up to floating point. Defaults to 128.
        zero_dead (bool): Code 0 for dead inputs, as GPTQ does. Defaults to
            True.

    Returns:
        QuantizedWeight: int8 codes of ``weight``'s shape, with the scale of
        :func:`~mmdet_hawq.quant.quantizer.choose_scale` of the float weight.

    Raises:
        ValueError: ``axis`` is not None or 0, the Hessians do not fit the
            weight, or ``weight`` is not finite.
    """
    if axis not in (None, 0):
        raise ValueError(f'axis must be None or 0, got {axis!r}')
    if weight.dim() < 2:
        raise ValueError('GPTQ needs a weight of at least 2 dimensions, got '
                         f'shape {tuple(weight.shape)}')
    if block_size < 1:
        raise ValueError(f'block_size must be positive, got {block_size}')
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()
    scale = choose_scale(w, bits, axis)
    hessians = [hessian] if torch.is_tensor(hessian) else list(hessian)
    out = w.shape[0]
    w2 = w.reshape(out, -1)
    rows = out // len(hessians)
    d = w2.shape[1]
    if rows * len(hessians) != out or any(
            tuple(h.shape) != (d, d) for h in hessians):
        raise ValueError(
            f'{len(hessians)} Hessian(s) of shapes '
            f'{[tuple(h.shape) for h in hessians]} do not fit a weight '
            f'viewed as {tuple(w2.shape)}')
    s_rows = scale.reshape(out, 1) if axis == 0 else scale
    codes = torch.cat([
        _gptq_rows(w2[g * rows:(g + 1) * rows], h,
                   s_rows[g * rows:(g + 1) * rows] if axis == 0 else s_rows,
                   qmax(bits), damp, act_order, block_size, zero_dead)
        for g, h in enumerate(hessians)
    ])
    codes = codes.to(torch.int8).reshape(w.shape).to(weight.device)
    return QuantizedWeight(codes, scale.to(weight.device), bits, axis)


@dataclass
class GptqResult:
    """What :func:`gptq_apply` did.

    Attributes:
        applied (dict[str, QuantizedWeight]): Codes and scale of each
            quantized weight, in plan order, as
            :func:`~mmdet_hawq.quant.plan.quantize_weights_` returns them.
        rounding (dict[str, str]): ``'gptq'`` or ``'nearest'`` per weight.
        notes (dict[str, str]): Why a weight got nearest rounding, or that
            its ``H`` had fewer input rows than columns (dampened).
    """

    applied: Dict[str, QuantizedWeight]
    rounding: Dict[str, str]
    notes: Dict[str, str]


@torch.no_grad()
def gptq_apply(model: nn.Module,
               plan: Mapping[str, Optional[int]],
               batches: Sequence[Any],
               forward_fn: ForwardFn,
               axis: Optional[int] = None,
               damp: float = 0.01,
               act_order: bool = False,
               block_size: int = 128,
               sequential: bool = True,
               stage_size: int = 1,
               progress: Optional[Callable[[int, int], None]] = None
               ) -> GptqResult:
    """Fake-quantize a plan's weights in place with GPTQ codes.

    Weights without a GPTQ path (embeddings, ``Conv1d``/``Conv3d``) and
    those that see no input on the calibration batches get nearest rounding
    (the first before any ``H`` is collected, so later layers see them
    quantized), and so does a weight whose ``H`` is not finite or not
    positive definite even after dampening; each gets a note, and no weight
    is ever left non-finite. The others are quantized in forward order
    (:func:`forward_order`):

    * ``sequential=True``: ``stage_size`` weights at a time, each stage's
      ``H`` collected with every earlier weight already quantized — one pass
      over the calibration batches per stage, so ``ceil(n / stage_size)``
      passes for ``n`` weights (one pass per weight by default: 114 passes
      for DETR-R50); peak ``H`` memory is that of the largest stage
      (:func:`hessian_bytes`);
    * ``sequential=False``: every ``H`` from the float model in one pass;
      all of them are held at once.

    Args:
        model (nn.Module): The model (unwrapped); in eval mode while this
            runs, its mode restored after.
        plan (Mapping): Weight name → bits, or None for float.
        batches (Sequence): Calibration batches.
        forward_fn (Callable): ``(model, batch) → anything``, one forward
            pass (e.g. :func:`~mmdet_hawq.models.family.decoder_outputs`).
        axis (int, optional): 0 for per-channel scales; None for per tensor.
            Defaults to None.
        damp (float): See :func:`gptq_quantize`. Defaults to 0.01.
        act_order (bool): See :func:`gptq_quantize`. Defaults to False.
        block_size (int): See :func:`gptq_quantize`. Defaults to 128.
        sequential (bool): Collect each stage's ``H`` from the partly
            quantized model. Defaults to True.
        stage_size (int): Weights per stage when sequential. Defaults to 1.
        progress (Callable, optional): Called as ``progress(done, total)``
            after each weight GPTQ rounds. Defaults to None.

    Returns:
        GptqResult: Codes, rounding and notes per weight.

    Raises:
        HawqUserError: The plan names a weight the model does not have.
    """
    if stage_size < 1:
        raise ValueError(f'stage_size must be positive, got {stage_size}')
    with eval_mode(model):
        return _gptq_apply(model, plan, batches, forward_fn, axis, damp,
                           act_order, block_size, sequential, stage_size,
                           progress)


def _gptq_apply(model: nn.Module, plan: Mapping[str, Optional[int]],
                batches: Sequence[Any], forward_fn: ForwardFn,
                axis: Optional[int], damp: float, act_order: bool,
                block_size: int, sequential: bool, stage_size: int,
                progress: Optional[Callable[[int, int], None]]
                ) -> GptqResult:
    """:func:`gptq_apply` with the model in eval mode."""
    params = named_weights(model, plan)
    targets = gptq_targets(model)
    todo = [n for n, b in plan.items() if b is not None]
    applied: Dict[str, QuantizedWeight] = {}
    rounding: Dict[str, str] = {}
    notes: Dict[str, str] = {}

    def nearest(name: str, why: str) -> None:
        applied[name] = quantize_weight(params[name].data, plan[name], axis)
        params[name].data.copy_(applied[name].dequantize(params[name].dtype))
        rounding[name], notes[name] = 'nearest', why

    def gptq(name: str, collector: HessianCollector) -> None:
        rows = collector.count(name)
        if rows == 0:
            nearest(name, 'nearest rounding: no input on the calibration '
                    'batches')
            return
        hessians = collector.hessians(name)
        if not all(bool(torch.isfinite(h).all()) for h in hessians):
            nearest(name, 'nearest rounding: its inputs on the calibration '
                    'batches are not finite')
            return
        try:
            qw = gptq_quantize(params[name].data, hessians, plan[name], axis,
                               damp, act_order, block_size)
        except ValueError as exc:  # not positive definite, even dampened
            nearest(name, f'nearest rounding: {exc}')
            return
        applied[name], rounding[name] = qw, 'gptq'
        params[name].data.copy_(qw.dequantize(params[name].dtype))
        d = max(targets[name].dims)
        if rows < d:
            notes[name] = (f'{rows} calibration input rows for a {d} x {d} '
                           'H: singular, rounded with the dampened H; use '
                           'more calibration images')

    for name in todo:
        if name not in targets:
            nearest(name, 'nearest rounding: no GPTQ path (no inputs it '
                    'multiplies, e.g. an embedding)')
    names = [n for n in todo if n in targets]
    calls = None
    if names and batches and sequential:  # the order matters only then
        calls = call_sequence(model, names, batches[0], forward_fn)
        names = first_call_order(model, names, calls)
    done = 0

    def step(name: str, collector: HessianCollector) -> None:
        nonlocal done
        gptq(name, collector)
        done += 1
        if progress is not None:
            progress(done, len(names))

    if not sequential:
        collector = collect_hessians(model, names, batches, forward_fn)
        for name in names:
            step(name, collector)
    else:
        for start in range(0, len(names), stage_size):
            stage = names[start:start + stage_size]
            collector = collect_hessians(model, stage, batches, forward_fn,
                                         calls)
            for name in stage:
                step(name, collector)
            del collector
    return GptqResult({n: applied[n] for n in plan if n in applied},
                      {n: rounding[n] for n in plan if n in rounding},
                      notes)


def output_error(weight: torch.Tensor, quantized: torch.Tensor,
                 hessian: Hessians) -> float:
    """The layer-output error ``||X Wᵀ − X Qᵀ||² = Σ_g tr(ΔW_g H_g ΔW_gᵀ)``.

    Args:
        weight (Tensor): (out, ...) weight.
        quantized (Tensor): Its quantized value, same shape.
        hessian (Tensor | Sequence[Tensor]): ``H`` of each row block, as in
            :func:`gptq_quantize`.

    Returns:
        float: The error summed over the calibration inputs.
    """
    hessians = [hessian] if torch.is_tensor(hessian) else list(hessian)
    delta = (weight.detach().double() - quantized.detach().double()
             ).reshape(weight.shape[0], -1)
    rows = weight.shape[0] // len(hessians)
    return float(sum(
        ((delta[g * rows:(g + 1) * rows] @ h.double()) *
         delta[g * rows:(g + 1) * rows]).sum()
        for g, h in enumerate(hessians)))


@torch.no_grad()
def gptq_error_ratios(model: nn.Module,
                      names: Sequence[str],
                      bits: Sequence[int],
                      batches: Sequence[Any],
                      forward_fn: ForwardFn,
                      axis: Optional[int] = None,
                      damp: float = 0.01,
                      act_order: bool = False,
                      block_size: int = 128) -> Dict[str, Dict[int, float]]:
    """How much GPTQ lowers each weight's layer-output error, per bit-width.

    With every ``H`` from the float model (one pass over the batches), the
    ratio of :func:`output_error` with GPTQ codes to that with nearest
    rounding, for each weight and bit-width. Multiplying nearest rounding's
    error terms ``||Q_b(W) − W||²`` by it gives error terms that reflect
    GPTQ's rounding in the ILP. Weights GPTQ cannot round (or whose ``H``
    fails) get 1.0.

    Args:
        model (nn.Module): The float model (unwrapped); in eval mode while
            this runs, its mode restored after.
        names (Sequence[str]): Weights to rate.
        bits (Sequence[int]): Candidate bit-widths.
        batches (Sequence): Calibration batches.
        forward_fn (Callable): ``(model, batch) → anything``.
        axis (int, optional): 0 for per-channel scales. Defaults to None.
        damp (float): See :func:`gptq_quantize`. Defaults to 0.01.
        act_order (bool): See :func:`gptq_quantize`. Defaults to False.
        block_size (int): See :func:`gptq_quantize`. Defaults to 128.

    Returns:
        dict[str, dict[int, float]]: Ratio per weight and bit-width, in
        ``[0, ∞)``; below 1 where GPTQ helps.
    """
    targets = gptq_targets(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    rated = [n for n in names if n in targets]
    with eval_mode(model):
        collector = collect_hessians(model, rated, batches, forward_fn)
    ratios = {n: {b: 1.0 for b in bits} for n in names}
    for name in rated:
        hessians = collector.hessians(name)
        if collector.count(name) == 0 or not all(
                bool(torch.isfinite(h).all()) for h in hessians):
            continue
        w = params[name].data
        for b in bits:
            near = output_error(w, quantize_weight(w, b, axis).dequantize(
                torch.float64), hessians)
            try:
                codes = gptq_quantize(w, hessians, b, axis, damp, act_order,
                                      block_size)
            except ValueError:
                continue
            if near > 0:
                ratios[name][b] = output_error(
                    w, codes.dequantize(torch.float64), hessians) / near
    return ratios

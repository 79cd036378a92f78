"""A precision plan is plain data: weight name → :class:`PlanEntry` (bits,
scale axis and rounding).

One function, :func:`apply_plan`, applies a plan to a model in place: every
entry's weight is replaced by its fake-quantized copy, rounded to nearest
(the paper's) or by GPTQ (:mod:`.gptq`) as the entry says. Plans are
JSON-serialisable and saved next to results.
"""
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, Mapping,
                    Optional, Sequence)

import torch
import torch.nn as nn

from ..errors import HawqUserError
from .gptq import GptqResult, gptq_apply
from .gptq_inputs import ForwardFn
from .quantizer import (QuantizedWeight, check_bits, named_weights,
                        quantize_weight)

ROUNDINGS = ('nearest', 'gptq')


@dataclass(frozen=True)
class PlanEntry:
    """How one weight is quantized.

    Attributes:
        bits (int, optional): Bit-width; None keeps the weight in float.
        axis (int, optional): 0 for per-output-channel scales; None for one
            scale per tensor (the paper's).
        rounding (str): ``'nearest'`` (the paper's) or ``'gptq'``.
    """

    bits: Optional[int]
    axis: Optional[int] = None
    rounding: str = 'nearest'


PrecisionPlan = Dict[str, PlanEntry]


def make_plan(bits: Mapping[str, Optional[int]], axis: Optional[int] = None,
              rounding: str = 'nearest') -> PrecisionPlan:
    """A plan from bit-widths by weight name (None: float), every entry
    with the same ``axis`` and ``rounding``."""
    return {n: PlanEntry(b, axis, rounding) for n, b in bits.items()}


def uniform_plan(names: Iterable[str], bits: int, axis: Optional[int] = None,
                 rounding: str = 'nearest') -> PrecisionPlan:
    """Every weight in ``names`` at ``bits``."""
    check_bits(bits)
    return {name: PlanEntry(bits, axis, rounding) for name in names}


def plan_bits(plan: Mapping[str, PlanEntry]) -> Dict[str, Optional[int]]:
    """Weight name → bits (None: float), in plan order."""
    return {n: e.bits for n, e in plan.items()}


def validate_plan(plan: Mapping[str, PlanEntry],
                  weights: Mapping[str, nn.Parameter],
                  source: Optional[str] = None) -> None:
    """Raise unless ``plan`` names exactly the quantizable weights.

    Args:
        plan (Mapping): Weight name → entry.
        weights (Mapping): The model's quantizable weights by name.
        source (str, optional): The plan's file, named in the errors.
            Defaults to None.
    """
    what = f'precision plan {source!r}' if source else 'the precision plan'
    unknown = sorted(set(plan) - set(weights))
    if unknown:
        raise HawqUserError(
            f'{what} names {len(unknown)} weight(s) the model '
            f'does not have or does not quantize, e.g. {unknown[:3]}: fix '
            'the names (list them with `tools/ptq.py CONFIG --list-layers`)')
    missing = [n for n in weights if n not in plan]
    if missing:
        raise HawqUserError(
            f'{what} lacks {len(missing)} quantizable weight(s), '
            f'e.g. {missing[:3]}: give each a bit-width, or null to keep it '
            'in float')


def _entry(name: str, value: Any, what: str, axis: Optional[int],
           rounding: str) -> PlanEntry:
    """One entry of a plan file: a bit-width or null (``axis`` and
    ``rounding`` from the caller), or an object with ``bits`` and optional
    ``axis`` and ``rounding``."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {'bits', 'axis', 'rounding'})
        if unknown or 'bits' not in value:
            raise HawqUserError(
                f'{what}: entry {name!r} {value!r} is not a plan entry: give '
                'a bit-width, null, or {"bits": B, "axis": null or 0, '
                '"rounding": "nearest" or "gptq"}')
        axis = value.get('axis', axis)
        rounding = value.get('rounding', rounding)
        value = value['bits']
    if value is not None:
        check_bits(value, f'{what}: bit-width of {name!r}', null_ok=True)
    if axis not in (None, 0):
        raise HawqUserError(
            f'{what}: entry {name!r} has axis {axis!r}: give null (per '
            'tensor) or 0 (per output channel)')
    if rounding not in ROUNDINGS:
        raise HawqUserError(
            f'{what}: entry {name!r} has rounding {rounding!r}: give one '
            f'of {", ".join(ROUNDINGS)}')
    return PlanEntry(value, axis, rounding)


@torch.no_grad()
def apply_plan(model: nn.Module,
               plan: Mapping[str, PlanEntry],
               batches: Optional[Sequence[Any]] = None,
               forward_fn: Optional[ForwardFn] = None,
               gptq: Optional[Mapping[str, Any]] = None,
               progress: Optional[Callable[[int, int], None]] = None
               ) -> GptqResult:
    """Fake-quantize the model's weights in place as ``plan`` says.

    Nearest-rounded entries are quantized first, so that GPTQ's
    calibration inputs see them quantized; GPTQ entries then go through
    :func:`~.gptq.gptq_apply`, one call per scale axis.

    Args:
        model (nn.Module): The detector (unwrapped).
        plan (Mapping): Weight name → :class:`PlanEntry`.
        batches (Sequence, optional): Calibration batches; needed only by
            GPTQ entries. Defaults to None.
        forward_fn (Callable, optional): ``(model, batch) → anything``, one
            forward pass for GPTQ (e.g.
            :func:`~mmdet_hawq.models.decoder_outputs`). Defaults to None.
        gptq (Mapping, optional): GPTQ's ``damp``, ``act_order``,
            ``block_size``, ``sequential`` and ``stage_size`` (other keys
            are ignored). Defaults to None (GPTQ's defaults).
        progress (Callable, optional): ``progress(done, total)`` after each
            GPTQ weight. Defaults to None.

    Returns:
        GptqResult: Codes and scale of each quantized weight (in plan
        order; :func:`~mmdet_hawq.quant.packing.pack_state_dict` stores
        exactly these), the rounding each got and notes.

    Raises:
        HawqUserError: The plan names a weight the model does not have, or
            has GPTQ entries but no calibration batches.
    """
    params = named_weights(model, plan)
    nearest = {n: e for n, e in plan.items()
               if e.bits is not None and e.rounding == 'nearest'}
    applied = quantize_weights_({n: params[n] for n in nearest}, nearest)
    rounding = {n: 'nearest' for n in nearest}
    notes: Dict[str, str] = {}
    for axis in (None, 0):
        bits = {n: e.bits for n, e in plan.items() if e.bits is not None
                and e.rounding == 'gptq' and e.axis == axis}
        if not bits:
            continue
        if not batches or forward_fn is None:
            raise HawqUserError(
                'the precision plan has GPTQ entries but no calibration '
                'batches were given: pass calibration images, or round to '
                'nearest')
        opts = {k: v for k, v in (gptq or {}).items() if k in (
            'damp', 'act_order', 'block_size', 'sequential', 'stage_size')}
        result = gptq_apply(model, bits, batches, forward_fn, axis,
                            progress=progress, **opts)
        applied.update(result.applied)
        rounding.update(result.rounding)
        notes.update(result.notes)
    return GptqResult({n: applied[n] for n in plan if n in applied},
                      {n: rounding[n] for n in plan if n in rounding}, notes)


@torch.no_grad()
def quantize_weights_(weights: Mapping[str, nn.Parameter],
                      plan: Mapping[str, PlanEntry]
                      ) -> Dict[str, QuantizedWeight]:
    """Fake-quantize the given weights in place to nearest (no validation;
    the entries' rounding is not read).

    Args:
        weights (Mapping[str, nn.Parameter]): Weights by name, e.g. from
            :func:`~.selection.quantizable_weights`.
        plan (Mapping): Weight name → entry, for every weight given.

    Returns:
        dict[str, QuantizedWeight]: Codes and scale of each quantized weight.
    """
    applied = {}
    for name, param in weights.items():
        entry = plan[name]
        if entry.bits is None:
            continue
        qw = quantize_weight(param.data, entry.bits, entry.axis)
        param.data.copy_(qw.dequantize(param.dtype))
        applied[name] = qw
    return applied


@contextmanager
def temporarily_quantized(weights: Mapping[str, nn.Parameter],
                          plan: Mapping[str, PlanEntry]) -> Iterator[None]:
    """The weights a plan names fake-quantized (nearest) inside the block,
    restored bit for bit after it (also when the block raises).

    Args:
        weights (Mapping[str, nn.Parameter]): Weights by name.
        plan (Mapping): Name → entry; names not in the plan stay as they
            are.
    """
    saved = {n: weights[n].detach().clone() for n in plan}
    try:
        with torch.no_grad():
            quantize_weights_({n: weights[n] for n in plan}, plan)
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                weights[n].copy_(value)


def plan_stats(plan: Mapping[str, PlanEntry],
               numels: Mapping[str, int],
               float_bits: int = 32) -> Dict[str, float]:
    """Average bit-width and weight memory of a plan.

    Args:
        plan (Mapping): Weight name → entry.
        numels (Mapping): Weight name → number of elements.
        float_bits (int): Bits of a weight left in float. Defaults to 32.

    Returns:
        dict: ``avg_bits`` (over quantized elements, as in the paper),
        ``avg_bits_all`` (float weights counted at ``float_bits``),
        ``weight_bytes`` (packed codes of the quantized weights plus float
        ones) and ``fp32_bytes`` of the same weights.
    """
    bits = plan_bits(plan)
    q_elems = sum(numels[n] for n, b in bits.items() if b is not None)
    q_bits = sum(numels[n] * b for n, b in bits.items() if b is not None)
    all_elems = sum(numels[n] for n in bits)
    all_bits = q_bits + float_bits * (all_elems - q_elems)
    return dict(
        avg_bits=q_bits / q_elems if q_elems else float('nan'),
        avg_bits_all=all_bits / all_elems if all_elems else float('nan'),
        weight_bytes=all_bits / 8.0,
        fp32_bytes=all_elems * 4.0)


def save_plan(plan: Mapping[str, PlanEntry], path: str) -> None:
    """Write a plan as JSON, one object per weight (model order kept)."""
    with open(path, 'w') as f:
        json.dump({n: asdict(e) for n, e in plan.items()}, f, indent=1)


def load_plan(path: str, axis: Optional[int] = None,
              rounding: str = 'nearest') -> PrecisionPlan:
    """Read a plan written by :func:`save_plan`, or a plain mapping of
    weight names to bit-widths (null: float).

    Args:
        path (str): The JSON file.
        axis (int, optional): Scale axis of the entries that give only a
            bit-width. Defaults to None (per tensor).
        rounding (str): Rounding of the entries that give only a bit-width.
            Defaults to 'nearest'.

    Raises:
        HawqUserError: The file cannot be read or an entry is not valid.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise HawqUserError(
            f'precision plan {path!r} could not be read ({err}): give a JSON '
            'file mapping weight names to bit-widths') from None
    if not isinstance(raw, dict):
        raise HawqUserError(
            f'precision plan {path!r} is not a JSON object: give a mapping '
            'from weight names to bit-widths')
    what = f'precision plan {path!r}'
    return {n: _entry(n, v, what, axis, rounding) for n, v in raw.items()}

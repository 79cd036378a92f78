"""A precision plan is plain data: weight name → bit-width (or None = float).

One function, :func:`apply_plan`, applies a plan to a model in place by
rewriting each weight's data with its fake-quantized copy. Plans are
JSON-serialisable and saved next to results.
"""
import json
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import HawqUserError
from .quantizer import QuantizedWeight, check_bits, quantize_weight
from .selection import DEFAULT_EXCLUDE, quantizable_weights

PrecisionPlan = Dict[str, Optional[int]]


def uniform_plan(names: Iterable[str], bits: int) -> PrecisionPlan:
    """Every weight in ``names`` at ``bits``."""
    check_bits(bits)
    return {name: bits for name in names}


def validate_plan(plan: Mapping[str, Optional[int]],
                  weights: Mapping[str, nn.Parameter],
                  source: Optional[str] = None) -> None:
    """Raise unless ``plan`` names exactly the quantizable weights.

    Args:
        plan (Mapping): Weight name → bits or None.
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
    check_plan_bits(plan, source)


def check_plan_bits(plan: Mapping[str, Optional[int]],
                    source: Optional[str] = None) -> None:
    """Raise unless every entry of ``plan`` is a bit-width or None (needs
    no model: the hook checks a plan file's entries when it is built).

    Args:
        plan (Mapping): Weight name → bits or None.
        source (str, optional): The plan's file, named in the errors.
            Defaults to None.
    """
    what = f'precision plan {source!r}' if source else 'the precision plan'
    for name, bits in plan.items():
        if bits is not None:
            check_bits(bits, f'{what}: bit-width of {name!r}', null_ok=True)


@torch.no_grad()
def apply_plan(model: nn.Module,
               plan: Mapping[str, Optional[int]],
               axis: Optional[int] = None,
               include: Optional[Sequence[str]] = None,
               exclude: Sequence[str] = DEFAULT_EXCLUDE
               ) -> Dict[str, QuantizedWeight]:
    """Fake-quantize the model's weights in place as ``plan`` says.

    Args:
        model (nn.Module): The detector (unwrapped).
        plan (Mapping): Weight name → bits, or None for float.
        axis (int, optional): Channel axis for per-channel scales; None for
            per tensor (the paper). Defaults to None.
        include (Sequence[str], optional): See :func:`list_weights`.
            Defaults to None.
        exclude (Sequence[str]): See :func:`list_weights`. Defaults to
            :data:`DEFAULT_EXCLUDE`.

    Returns:
        dict[str, QuantizedWeight]: Codes and scale of each quantized weight;
        :func:`~mmdet_hawq.quant.packing.pack_state_dict` stores exactly these.
    """
    weights = quantizable_weights(model, include, exclude)
    validate_plan(plan, weights)
    return quantize_weights_(weights, plan, axis)


@torch.no_grad()
def quantize_weights_(weights: Mapping[str, nn.Parameter],
                      plan: Mapping[str, Optional[int]],
                      axis: Optional[int] = None
                      ) -> Dict[str, QuantizedWeight]:
    """Fake-quantize the given weights in place (no validation).

    Args:
        weights (Mapping[str, nn.Parameter]): Weights by name, e.g. from
            :func:`quantizable_weights` with the user's patterns.
        plan (Mapping): Weight name → bits, or None for float.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.

    Returns:
        dict[str, QuantizedWeight]: Codes and scale of each quantized weight.
    """
    applied = {}
    for name, param in weights.items():
        bits = plan[name]
        if bits is None:
            continue
        qw = quantize_weight(param.data, bits, axis)
        param.data.copy_(qw.dequantize(param.dtype))
        applied[name] = qw
    return applied


@contextmanager
def temporarily_quantized(weights: Mapping[str, nn.Parameter],
                          plan: Mapping[str, Optional[int]],
                          axis: Optional[int] = None) -> Iterator[None]:
    """The weights a plan names fake-quantized inside the block, restored
    bit for bit after it (also when the block raises).

    Args:
        weights (Mapping[str, nn.Parameter]): Weights by name.
        plan (Mapping): Name → bits, or None for float; names not in the
            plan stay as they are.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.
    """
    saved = {n: weights[n].detach().clone() for n in plan}
    try:
        with torch.no_grad():
            quantize_weights_({n: weights[n] for n in plan}, plan, axis)
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                weights[n].copy_(value)


def plan_stats(plan: Mapping[str, Optional[int]],
               numels: Mapping[str, int],
               float_bits: int = 32) -> Dict[str, float]:
    """Average bit-width and weight memory of a plan.

    Args:
        plan (Mapping): Weight name → bits or None.
        numels (Mapping): Weight name → number of elements.
        float_bits (int): Bits of a weight left in float. Defaults to 32.

    Returns:
        dict: ``avg_bits`` (over quantized elements, as in the paper),
        ``avg_bits_all`` (float weights counted at ``float_bits``),
        ``weight_bytes`` (packed codes of the quantized weights plus float
        ones) and ``fp32_bytes`` of the same weights.
    """
    q_elems = sum(numels[n] for n, b in plan.items() if b is not None)
    q_bits = sum(numels[n] * b for n, b in plan.items() if b is not None)
    all_elems = sum(numels[n] for n in plan)
    all_bits = q_bits + float_bits * (all_elems - q_elems)
    return dict(
        avg_bits=q_bits / q_elems if q_elems else float('nan'),
        avg_bits_all=all_bits / all_elems if all_elems else float('nan'),
        weight_bytes=all_bits / 8.0,
        fp32_bytes=all_elems * 4.0)


def save_plan(plan: Mapping[str, Optional[int]], path: str) -> None:
    """Write a plan as JSON (model order kept)."""
    with open(path, 'w') as f:
        json.dump(dict(plan), f, indent=1)


def load_plan(path: str) -> PrecisionPlan:
    """Read a plan written by :func:`save_plan`."""
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, ValueError) as err:
        raise HawqUserError(
            f'precision plan {path!r} could not be read ({err}): give a JSON '
            'file mapping weight names to bit-widths') from None
    if not isinstance(plan, dict):
        raise HawqUserError(
            f'precision plan {path!r} is not a JSON object: give a mapping '
            'from weight names to bit-widths')
    return plan

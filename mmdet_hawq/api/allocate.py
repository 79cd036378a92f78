"""Traces → error terms → ILP plan, with the per-layer report columns.

The error term of a weight at ``b`` bits is nearest rounding's
``||Q_b(W) − W||²`` (:func:`~mmdet_hawq.quant.error_terms`; for ``outquant``
measured from the 8-bit point), or, with the GPTQ setting
``error_terms='gptq'``, that times GPTQ's layer-output error ratio
(:func:`~mmdet_hawq.quant.gptq_error_ratios`). Zero-trace weights that still
change the outputs (blind spots) are fixed at the top bit-width.
"""
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn

from ..allocation import (pareto_sweep, sensitivities_from_traces,
                          solve_allocation)
from ..allocation.ilp import round_significant
from ..models import decoder_outputs
from ..quant import error_terms, gptq_error_ratios
from ..sensitivity import TraceResult
from .settings import QuantSettings

Errors = Dict[str, Dict[int, float]]


@dataclass
class Allocation:
    """What the allocation step decided and why.

    Attributes:
        bits (dict[str, int]): Weight name → bits.
        columns (dict[str, dict]): Per-layer report columns (trace mean and
            standard error, the sensitivity used and its note, error terms
            by bits, GPTQ's ratios when used).
        report (dict): The sensitivity report's data (traces, Pareto
            curve; :func:`~mmdet_hawq.report.write_sensitivity_report`).
        objective (float): The ILP's predicted perturbation.
    """

    bits: Dict[str, int]
    columns: Dict[str, Dict[str, Any]]
    report: Dict[str, Any]
    objective: float


def allocate(model: nn.Module, weights: Dict[str, nn.Parameter],
             result: TraceResult, settings: QuantSettings,
             floors: Dict[str, int], batches: Optional[Sequence[Any]],
             logger: logging.Logger) -> Allocation:
    """The ILP on the traces, and the Pareto curve of the same inputs.

    Args:
        model (nn.Module): The float detector (for GPTQ's error ratios).
        weights (dict): The weights to quantize, by name.
        result (TraceResult): Their traces.
        settings (QuantSettings): The run's settings.
        floors (dict): Weight name → fewest bits.
        batches (Sequence, optional): Calibration batches (GPTQ's ratios).
        logger (logging.Logger): Warnings and the result line.
    """
    s, names = settings.sensitivity, list(weights)
    mean, se = result.mean(), result.stderr()
    unconverged = [n for n, ok in zip(names, result.converged(s.tol))
                   if not ok]
    if unconverged:
        logger.warning(
            f'sensitivity: {len(unconverged)} of {len(names)} layers did not '
            f"reach rel. SE {s.tol} in {result.num_samples} samples, "
            f'e.g. {unconverged[:3]}; they are marked in the report')
    used, notes = sensitivities_from_traces(names, mean, se, s.tol,
                                            s.negative_traces)
    bits = list(range(settings.bit_range[0], settings.bit_range[1] + 1))
    fixed = blind_spots(result, bits, used, notes)
    if fixed:
        logger.warning(
            f'sensitivity: {len(fixed)} weight(s) have no gradient path but '
            f'change the outputs, kept at {bits[-1]} bits: {sorted(fixed)}')
    errors = error_terms(weights, bits, settings.axis, reference_bits=8
                         if settings.metric == 'outquant' else None)
    ratios = None
    if settings.rounding == 'gptq' and \
            settings.gptq.error_terms == 'gptq':
        ratios = gptq_error_ratios(
            model, names, bits, batches, decoder_outputs, settings.axis,
            settings.gptq.damp, settings.gptq.act_order,
            settings.gptq.block_size)
        errors = {n: {b: e * ratios[n][b] for b, e in by_bits.items()}
                  for n, by_bits in errors.items()}
    used, errors = _plan_inputs(used, errors)
    numels = {n: p.numel() for n, p in weights.items()}
    alloc = solve_allocation(used, errors, numels, settings.target_bits,
                             bits, fixed=fixed, min_bits=floors)
    columns = {}
    for i, n in enumerate(names):
        columns[n] = dict(
            trace_mean=float(mean[i]), trace_se=float(se[i]),
            trace_used=used[n], trace_note=notes[n],
            error_by_bits={str(b): errors[n][b] for b in bits})
        if ratios is not None:
            columns[n]['gptq_error_ratio'] = {
                str(b): ratios[n][b] for b in bits}
    # the Pareto curve of the same traces: predicted perturbation vs bits
    targets = np.round(np.arange(bits[0], bits[-1] + 1e-9, 0.25), 2)
    report = dict(
        metric=settings.metric, estimator=result.estimator, names=names,
        traces=dict(result.to_dict(), tol=s.tol, mean=mean.tolist(),
                    se=se.tolist()),
        pareto=pareto_sweep(used, errors, numels, targets, bits, fixed,
                            floors))
    logger.info(
        f'allocation: {alloc.avg_bits:.3f} bits on average (target '
        f'{settings.target_bits}), predicted perturbation '
        f'{alloc.objective:.4g}')
    return Allocation(alloc.plan, columns, report, alloc.objective)


def _plan_inputs(used: Dict[str, float], errors: Errors
                 ) -> Tuple[Dict[str, float], Errors]:
    """Sensitivities and error terms as the ILP sees them: rounded to
    :data:`~mmdet_hawq.allocation.ilp.PLAN_DIGITS` significant digits, far
    below the traces' standard errors, so float noise (another intra-op
    thread count) cannot change the plan."""
    return ({n: round_significant(v) for n, v in used.items()},
            {n: {b: round_significant(e) for b, e in by_bits.items()}
             for n, by_bits in errors.items()})


def blind_spots(result: TraceResult, bits: Sequence[int],
                used: Dict[str, float], notes: Dict[str, str]
                ) -> Dict[str, int]:
    """Zero-trace weights that change the outputs → fixed at the top bits.

    Every weight tested by the influence check gets a note: 'no influence'
    (its zero trace is right) or 'blind spot' (no gradient path, yet the
    outputs move); its sensitivity is set to 0 either way, and blind spots
    are returned for the ILP to fix at ``bits[-1]``.
    """
    no_grad = set(result.meta.get('no_gradient', []))
    fixed = {}
    for name, diff in result.meta.get('influence', {}).items():
        how = 'no gradient path' if name in no_grad else 'zero gradient'
        if diff > 0:
            fixed[name] = bits[-1]
            note = (f'blind spot: {how}, but {bits[0]}-bit weights change '
                    f'the outputs by up to {diff:.3g}: kept at {bits[-1]} '
                    'bits')
        else:
            note = (f'no influence: {how}, and {bits[0]}-bit weights leave '
                    'the outputs unchanged')
        used[name] = 0.0
        notes[name] = '; '.join(x for x in (notes[name], note) if x)
    return fixed

"""Activation quantization of a run: calibrate every site's range, choose
the int8 sites, fake-quantize them.

Steps: the sites (:func:`~mmdet_hawq.quant.activations.activation_modules`,
the convolutions' output sites after their BatchNorm) → their ranges from
the calibration images → each site's squared quantization error → with
``sensitivity``, each site's Gauss–Newton trace of the distillation loss
against the float teacher (:mod:`~mmdet_hawq.sensitivity.activation_traces`)
and its predicted damage, trace × error, and each layer's measured damage
(the loss with its sites alone quantized,
:mod:`~mmdet_hawq.sensitivity.measured_damage`), which the choice reads
(:func:`corrected_damage`) → the int8 sites: every site not kept float by
``float_sites``, or under an ``int8_macs`` budget the exact 0/1 program's
choice (:func:`~mmdet_hawq.allocation.sites.choose_int8_sites`) → their
quantizers on the model.
"""
import fnmatch
import logging
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..allocation.sites import choose_int8_sites
from ..errors import HawqUserError
from ..models import class_activation, decoder_outputs
from ..quant.activations import (OUTPUT, ActivationRange, activation_modules,
                                 attach_activation_quantizers,
                                 calibrate_range, captured_sites,
                                 conv_output_modules, observe_sites,
                                 quantized_activations, site_errors,
                                 site_macs, sqnr_db)
from ..quant.gptq_inputs import eval_mode
from ..sensitivity import DistillationObjective, TraceResult, hessian_mode
from ..sensitivity.activation_traces import activation_traces
from ..sensitivity.measured_damage import measured_damage
from .dist import process_shard

__all__ = ['corrected_damage', 'quantize_activations']


def quantize_activations(model: nn.Module, names: Sequence[str],
                         calibration: Any,
                         settings: Mapping[str, Any],
                         teacher: Optional[nn.Module],
                         distillation: Tuple[float, float],
                         logger: logging.Logger
                         ) -> Tuple[Dict[str, ActivationRange],
                                    List[Dict[str, Any]]]:
    """Calibrate the ranges of every activation site on the model with its
    quantized weights, choose the int8 sites (all of them, or by predicted
    damage under the ``int8_macs`` budget) and fake-quantize those from now
    on (:mod:`~mmdet_hawq.quant.activations`).

    Returns:
        tuple: The int8 sites' ranges, and one row per site (precision,
        MACs, error; trace and predicted damage with ``sensitivity``).
    """
    start = time.time()
    sites = activation_modules(model, names)
    modules = dict(model.named_modules())
    batches = calibration.batches
    # eval mode: the hook runs before the test loop calls eval()
    with torch.no_grad(), eval_mode(model):
        convs = [n for n, m in sites.items() if isinstance(m, nn.Conv2d)]
        where = conv_output_modules(
            model, convs, lambda: decoder_outputs(model, batches[0]))
        outputs = {n: modules[n] for n in where.values()}
        with observe_sites(sites, outputs) as seen:
            for batch in batches:
                decoder_outputs(model, batch)
    ranges = {n: calibrate_range(o, settings.method, settings.bits)
              for n, o in seen.items()}
    every = {**sites, **outputs}
    layer_of = {n: n for n in ranges if not n.endswith(OUTPUT)}
    layer_of.update({f'{o}{OUTPUT}': c for c, o in where.items()})
    macs = site_macs(sites, seen, where)
    inputs = [n for n in ranges if not n.endswith(OUTPUT)]
    keep_float = _float_sites(settings.float_sites, ranges, layer_of)
    damage: Dict[str, float] = {}
    columns: Dict[str, Dict[str, float]] = {n: {} for n in ranges}
    with eval_mode(model):
        errors = site_errors(every, ranges, lambda: [
            decoder_outputs(model, b) for b in batches])
    for n, (error, energy, clipped) in errors.items():
        db = sqnr_db(error, energy)
        columns[n].update(sqnr_db=None if math.isinf(db) else round(db, 2),
                          clipped_share=clipped / energy if energy else 0.0)
    if settings.sensitivity:
        objective = DistillationObjective(
            model, teacher, batches, {}, distillation[0], distillation[1],
            activation=class_activation(model))
        traces = _activation_traces(model, objective, every, list(ranges),
                                    len(batches), logger)
        predicted: Dict[str, float] = {}
        for n, mean, se in zip(traces.names, traces.mean(), traces.stderr()):
            error = errors[n][0] / len(batches)
            columns[n].update(squared_error=error, trace=float(mean),
                              trace_se=float(se),
                              predicted_damage=float(mean) * error)
            # an output site's damage is its layer's
            predicted[layer_of[n]] = predicted.get(layer_of[n], 0.0) + \
                columns[n]['predicted_damage']
        measured = _measured_damage(model, objective, every, ranges,
                                    layer_of, len(batches), logger)
        damage = corrected_damage(
            {n: p * len(batches) for n, p in predicted.items()}, measured)
        for n in ranges:  # the layer's values, which the choice reads
            columns[n].update(layer_measured_damage=measured[layer_of[n]],
                              layer_damage=damage[layer_of[n]])
    if settings.int8_macs is None:
        int8 = set(inputs) - set(keep_float)
    else:
        int8 = choose_int8_sites({n: damage.get(n, 0.0) for n in inputs},
                                 macs, settings.int8_macs, keep_float)
    chosen = {n: r for n, r in ranges.items() if layer_of[n] in int8}
    attach_activation_quantizers(every, chosen)
    rows = [dict(site=n, layer=layer_of[n],
                 precision='int8' if n in chosen else 'float', lo=r.lo,
                 hi=r.hi, macs=macs.get(n, 0), **columns[n])
            for n, r in ranges.items()]
    _warn_low_sqnr(rows, logger)
    share = sum(macs.get(n, 0) for n in int8) / max(1, sum(macs.values()))
    logger.info(
        f"activations: {len(chosen)} of {len(ranges)} sites int8 "
        f"({len(outputs)} convolution outputs; {share:.1%} of the MACs), "
        f"{settings.bits} bits, {settings.method} ranges from "
        f'{len(batches)} calibration batches, in '
        f'{time.time() - start:.1f} s')
    return chosen, rows


def _float_sites(patterns: Sequence[str], ranges: Mapping[str, Any],
                 layer_of: Mapping[str, str]) -> List[str]:
    """The input sites (layers) the ``float_sites`` patterns keep float.

    Raises:
        HawqUserError: A pattern matches no site.
    """
    out: List[str] = []
    for pattern in patterns:
        hit = [n for n in ranges if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise HawqUserError(
                f'activations float_sites pattern {pattern!r} matches no '
                f'activation site (e.g. {next(iter(ranges), "none")!r}): '
                'fix the pattern; the sites are listed in the run\'s '
                'activation_sites.json')
        out += [layer_of[n] for n in hit if layer_of[n] not in out]
    return out


def _activation_traces(model: nn.Module, objective: DistillationObjective,
                       sites: Mapping[str, nn.Module], names: List[str],
                       num_batches: int,
                       logger: logging.Logger) -> TraceResult:
    """Per-site Gauss–Newton traces of the distillation loss against the
    float teacher, at the model's quantized weights and float activations
    (:func:`~mmdet_hawq.sensitivity.activation_traces`)."""
    start = time.time()
    device = next(model.parameters()).device
    with hessian_mode(model, {}):
        result = activation_traces(
            lambda: captured_sites(sites, names), names,
            objective.gauss_newton_sample, num_batches, device,
            shard=process_shard())
    rel = result.rel_stderr()
    logger.info(
        f'activation sensitivity: {len(names)} sites, {result.num_samples} '
        f'samples, median rel. SE {float(np.median(rel)):.3f}, in '
        f'{time.time() - start:.1f} s')
    return result


def _measured_damage(model: nn.Module, objective: DistillationObjective,
                     sites: Mapping[str, nn.Module],
                     ranges: Mapping[str, ActivationRange],
                     layer_of: Mapping[str, str], num_batches: int,
                     logger: logging.Logger) -> Dict[str, float]:
    """Layer → increase of the distillation loss, summed over the
    calibration batches, with that layer's sites alone quantized
    (:func:`~mmdet_hawq.sensitivity.measured_damage`)."""
    start = time.time()
    groups: Dict[str, Dict[str, ActivationRange]] = {}
    for n, r in ranges.items():
        groups.setdefault(layer_of[n], {})[n] = r
    device = next(model.parameters()).device
    with hessian_mode(model, {}):  # the teacher's attention kernel
        measured, _ = measured_damage(
            objective.loss, groups,
            lambda group: quantized_activations(sites, group), num_batches,
            device, process_shard())
    logger.info(f'activation damage measured: {len(groups)} layers, '
                f'{num_batches} batches each, in {time.time() - start:.1f} s')
    return measured


#: A quantized site whose signal-to-quantization-noise ratio on the
#: calibration images is below this (dB) is warned of. Correct 8-bit ranges
#: of the small models are at 22 dB or more (6-bit: 19.5 dB and up), ranges
#: clipped by the old observer at 1-2 dB, 4-bit activations at 13-15 dB
#: (docs/usage.md).
LOW_SQNR_DB = 20.0


def corrected_damage(predicted: Mapping[str, float],
                     measured: Mapping[str, float]) -> Dict[str, float]:
    """Each layer's damage for the site choice: its measured damage (≥ 0),
    its predicted damage where it has no measurement.

    The quadratic model (averaged trace × squared error) cannot see what
    its expansion drops: the distillation loss's L1 box term, first order in
    the error and without curvature for the Gauss–Newton draws, and
    clipping errors beyond the quadratic region. Its averaged trace also
    assumes the error is spread like the curvature: a range that clips the
    negative side of a tensor a ReLU then zeroes makes a large error where
    the gradient is zero, which it counts as damage. With ranges broken on
    purpose on the small DETR at ``int8_macs=0.65``, choosing by the
    prediction kept such harmless layers float and lost 14 mAP; choosing by
    the measurement recovered to within 0.1 (docs/results.md).

    Args:
        predicted (Mapping[str, float]): Layer → predicted damage.
        measured (Mapping[str, float]): Layer → measured damage
            (:func:`~mmdet_hawq.sensitivity.measured_damage`).

    Returns:
        dict[str, float]: Layer → damage (≥ 0).
    """
    return {n: max(measured.get(n, p), 0.0) for n, p in predicted.items()}


def _warn_low_sqnr(rows: Sequence[Mapping[str, Any]],
                   logger: logging.Logger) -> None:
    """A warning for the quantized sites below :data:`LOW_SQNR_DB` (a range
    that clips, too few bits)."""
    low = sorted((r['sqnr_db'], r['site'], r['clipped_share']) for r in rows
                 if r['precision'] == 'int8' and r['sqnr_db'] is not None
                 and r['sqnr_db'] < LOW_SQNR_DB)
    if low:
        db, site, clipped = low[0]
        logger.warning(
            f'activations: {len(low)} quantized site(s) have an SQNR below '
            f'{LOW_SQNR_DB:g} dB on the calibration images (worst {site}: '
            f'{db:.1f} dB, {clipped:.1%} of its signal clipped by its '
            'range): expect a large accuracy loss; check their ranges in '
            'activation_sites.json, use more bits, or keep them float '
            '(float_sites)')

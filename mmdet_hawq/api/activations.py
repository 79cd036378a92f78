"""Activation quantization of a run: calibrate every site's range, choose
the int8 sites, fake-quantize them.

Steps: the sites (:func:`~mmdet_hawq.quant.activations.activation_modules`,
the convolutions' output sites after their BatchNorm) → their ranges from
the calibration images → each site's squared quantization error → with
``sensitivity``, each site's Gauss–Newton trace of the distillation loss
against the float teacher (:mod:`~mmdet_hawq.sensitivity.activation_traces`)
and its predicted damage, trace × error → the int8 sites by the exact 0/1
program under the ``int8_macs`` budget
(:func:`~mmdet_hawq.allocation.sites.choose_int8_sites`; every site when
the budget is 1) → their quantizers on the model.
"""
import fnmatch
import logging
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
                                 site_errors, site_macs)
from ..quant.gptq_inputs import eval_mode
from ..sensitivity import DistillationObjective, TraceResult, hessian_mode
from ..sensitivity.activation_traces import activation_traces
from .dist import process_shard

__all__ = ['quantize_activations']


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
    ranges = {n: calibrate_range(o, settings['method'], settings['bits'])
              for n, o in seen.items()}
    every = {**sites, **outputs}
    layer_of = {n: n for n in ranges if not n.endswith(OUTPUT)}
    layer_of.update({f'{o}{OUTPUT}': c for c, o in where.items()})
    macs = site_macs(sites, seen, where)
    inputs = [n for n in ranges if not n.endswith(OUTPUT)]
    keep_float = _float_sites(settings['float_sites'], ranges, layer_of)
    damage: Dict[str, float] = {}
    columns: Dict[str, Dict[str, float]] = {n: {} for n in ranges}
    if settings['sensitivity']:
        with eval_mode(model):
            errors = site_errors(every, ranges, lambda: [
                decoder_outputs(model, b) for b in batches])
        traces = _activation_traces(model, teacher, every, list(ranges),
                                    batches, distillation, logger)
        for n, mean, se in zip(traces.names, traces.mean(), traces.stderr()):
            error = errors[n] / len(batches)
            columns[n] = dict(squared_error=error, trace=float(mean),
                              trace_se=float(se),
                              predicted_damage=float(mean) * error)
            # an output site's damage is its layer's
            damage[layer_of[n]] = damage.get(layer_of[n], 0.0) + \
                columns[n]['predicted_damage']
    int8 = choose_int8_sites({n: damage.get(n, 0.0) for n in inputs}, macs,
                             settings['int8_macs'], keep_float)
    chosen = {n: r for n, r in ranges.items() if layer_of[n] in int8}
    attach_activation_quantizers(every, chosen)
    rows = [dict(site=n, layer=layer_of[n],
                 precision='int8' if n in chosen else 'float', lo=r.lo,
                 hi=r.hi, macs=macs.get(n, 0), **columns[n])
            for n, r in ranges.items()]
    share = sum(macs.get(n, 0) for n in int8) / max(1, sum(macs.values()))
    logger.info(
        f"activations: {len(chosen)} of {len(ranges)} sites int8 "
        f"({len(outputs)} convolution outputs; {share:.1%} of the MACs), "
        f"{settings['bits']} bits, {settings['method']} ranges from "
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


def _activation_traces(model: nn.Module, teacher: nn.Module,
                       sites: Mapping[str, nn.Module], names: List[str],
                       batches: Sequence[Any],
                       distillation: Tuple[float, float],
                       logger: logging.Logger) -> TraceResult:
    """Per-site Gauss–Newton traces of the distillation loss against the
    float ``teacher``, at the model's quantized weights and float
    activations (:func:`~mmdet_hawq.sensitivity.activation_traces`)."""
    start = time.time()
    objective = DistillationObjective(
        model, teacher, batches, {}, distillation[0], distillation[1],
        activation=class_activation(model))
    device = next(model.parameters()).device
    with hessian_mode(model, {}):
        result = activation_traces(
            lambda: captured_sites(sites, names), names,
            objective.gauss_newton_sample, len(batches), device,
            shard=process_shard())
    rel = result.rel_stderr()
    logger.info(
        f'activation sensitivity: {len(names)} sites, {result.num_samples} '
        f'samples, median rel. SE {float(np.median(rel)):.3f}, in '
        f'{time.time() - start:.1f} s')
    return result

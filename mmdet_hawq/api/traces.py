"""Per-layer Hessian traces of a run, read from or added to its cache.

Steps: frozen float teacher → student at float or 8-bit weights → samples
of the estimator (:mod:`~mmdet_hawq.sensitivity.hutchinson` or
:mod:`~mmdet_hawq.sensitivity.gauss_newton`), each saved to the cache
(:mod:`~mmdet_hawq.sensitivity.cache`) so that an interrupted run resumes →
which zero-trace weights still change the outputs
(:mod:`~mmdet_hawq.sensitivity.influence`). In a distributed run every rank
takes its share of the calibration batches and the samples are
all-reduced; the cache is read and written on rank 0 only.
"""
import copy
import hashlib
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from mmengine.dist import is_main_process

from ..models import (DISTILLATION_DEFAULTS, class_activation,
                      decoder_outputs, detector_family, distillation_outputs,
                      shares_queries)
from ..quant import fake_quantize, quantize_weights_, uniform_plan
from ..sensitivity import (DetrLossObjective, DistillationObjective,
                           TraceResult, cache_path, gauss_newton_traces,
                           hessian_mode, hutchinson_traces, key_hash,
                           load_cached, older_caches, output_influence,
                           save_cached)
from .dist import process_shard, run_on_main
from .critical import critical_indices
from .settings import QuantSettings

#: Settings that enter the trace cache key only away from these values.
OMITTED_AT_DEFAULT = dict(critical_classes=None)
#: Settings that do not change the traces' samples (only when to stop or
#: where to save).
NOT_IN_KEY = ('use_cache', 'cache_dir', 'max_samples', 'min_samples', 'tol',
              'negative_traces')
#: How random draws are seeded (part of the cache key): 3 = one generator
#: per (sample, batch), the same in every process, sigmoid heads'
#: Rademacher draws, seeded loss inputs.
DRAWS_VERSION = 3
#: Calibration batches on which zero-trace weights are tested for influence.
INFLUENCE_BATCHES = 2


def model_source(model: nn.Module) -> Dict[str, str]:
    """What identifies a model in the cache key when the caller gives
    nothing: its class and parameter shapes, and a hash of its weights."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return dict(model=key_hash(dict(type=type(model).__name__,
                                    shapes=shapes)),
                checkpoint=digest.hexdigest())


def cache_key(metric: str, settings: Mapping[str, Any], img_ids,
              source: Mapping[str, Any], axis: Optional[int],
              device: torch.device, shared_queries: bool = False) -> dict:
    """The trace cache key: everything the samples depend on
    (``shared_queries``: the 8-bit student of a two-stage model replays the
    teacher's query selection; its samples differ from those of releases
    before it)."""
    keep = {k: v for k, v in settings.items() if k not in NOT_IN_KEY}
    if shared_queries and metric == 'outquant':
        keep['queries'] = 'teacher'
    for name, default in OMITTED_AT_DEFAULT.items():
        if keep.get(name, default) == default:
            keep.pop(name, None)
    if axis is not None and metric == 'outquant':
        keep['per_channel'] = True  # the 8-bit point has per-channel scales
    # the draws come from a generator on the weights' device; a CPU and a
    # CUDA run of the same seed draw different streams (CPU keys unchanged)
    draws = DRAWS_VERSION if device.type == 'cpu' else \
        f'{DRAWS_VERSION}-{device.type}'
    return dict(metric=metric, draws=draws, settings=keep,
                model=source['model'], checkpoint=source['checkpoint'],
                calibration=key_hash(list(img_ids)))


def distillation_objective(model: nn.Module,
                           weights: Mapping[str, nn.Parameter],
                           batches: Sequence[Any],
                           student_bits: Optional[int] = 8,
                           axis: Optional[int] = None,
                           lambda_kl: Optional[float] = None,
                           temperature: Optional[float] = None,
                           **kwargs: Any) -> DistillationObjective:
    """The distillation objective of a student against its float teacher.

    The teacher is a frozen copy of ``model`` made now; ``model`` itself is
    the student, its ``weights`` put at ``student_bits`` uniform bits (the
    paper's 8-bit point of Out Sen Quant; None: left as they are). The
    caller restores the weights it needs afterwards.

    Args:
        model (nn.Module): The detector (unwrapped), float weights.
        weights (Mapping): The targeted weights of ``model`` by name.
        batches (Sequence): Preprocessed calibration batches.
        student_bits (int, optional): Bits of the student's weights.
            Defaults to 8.
        axis (int, optional): 0 for per-channel scales. Defaults to None.
        lambda_kl (float, optional): Weight of the KL term; None: the class
            head's default (:data:`~mmdet_hawq.models.DISTILLATION_DEFAULTS`).
        temperature (float, optional): Softmax temperature; None: likewise.
        **kwargs: ``layers``, ``outputs``, ``critical`` of
            :class:`~mmdet_hawq.sensitivity.DistillationObjective`.
    """
    activation = class_activation(model)
    default_kl, default_t = DISTILLATION_DEFAULTS[activation]
    teacher = copy.deepcopy(model)
    if student_bits is not None:
        # on exactly the targeted weights (the user's include/exclude)
        quantize_weights_(weights, uniform_plan(weights, student_bits, axis))
    return DistillationObjective(
        model, teacher, batches, dict(weights),
        default_kl if lambda_kl is None else lambda_kl,
        default_t if temperature is None else temperature,
        activation=activation, **kwargs)


def compute_traces(model: nn.Module, weights: Dict[str, nn.Parameter],
                   settings: QuantSettings, calibration: Any,
                   source: Mapping[str, Any], cache_dir: Optional[str],
                   logger: logging.Logger) -> TraceResult:
    """Per-layer traces of ``settings.metric`` on ``calibration`` (from the
    cache when present).

    The model's weights are float on entry and on exit; for ``outquant`` the
    student is put at the uniform 8-bit weights in between. Every weight
    whose trace is exactly 0 is then quantized alone to the lowest bits and
    the largest change of the float model's outputs is stored in
    ``result.meta['influence']``.

    Args:
        model (nn.Module): The detector (unwrapped), float weights.
        weights (dict): The weights to quantize, by name.
        settings (QuantSettings): The run's settings.
        calibration (Calibration): Batches, image ids and class names.
        source (Mapping): ``model`` and ``checkpoint`` identities for the
            cache key (:func:`model_source`).
        cache_dir (str, optional): Where samples are saved
            (:meth:`~.settings.QuantSettings.trace_cache`); None: not saved.
        logger (logging.Logger): Progress lines.

    Returns:
        TraceResult: Samples of every weight's trace.
    """
    metric, s = settings.metric, settings.trace_settings()
    lambda_kl, temperature = settings.distillation(class_activation(model))
    s.update(lambda_kl=lambda_kl, temperature=temperature)
    critical = None
    if s['critical_classes'] is not None:
        classes = calibration.classes
        critical = critical_indices(s['critical_classes'], classes)
        # column order: the same classes in another order are one objective
        s['critical_classes'] = [classes[i] for i in critical]
    estimator, axis = s['estimator'], settings.axis
    key = cache_key(metric, s, calibration.img_ids, source, axis,
                    next(iter(weights.values())).device,
                    shares_queries(model))
    path = cache_path(cache_dir, metric, estimator, key) if cache_dir \
        else None
    previous = run_on_main(load_cached, path, key) if path else None
    if previous is not None:
        logger.info(f'sensitivity: {previous.num_samples} cached samples '
                    f'from {path}')
    elif path:
        older = run_on_main(older_caches, cache_dir, metric, estimator, key,
                            (*OMITTED_AT_DEFAULT, 'per_channel'))
        if older:
            logger.warning(
                f'sensitivity: {len(older)} cache file(s) of this run written '
                f'by an earlier release are not read (another key), e.g. '
                f'{older[0]}: the samples are computed again; delete them to '
                'reclaim the space')
    float_state = {n: p.detach().clone() for n, p in weights.items()}
    batches = calibration.batches
    if metric == 'losssen':
        objective = DetrLossObjective(
            model, batches, detector_family(model).loss_needs_training_flag,
            s['seed'])
    else:
        objective = distillation_objective(
            model, weights, batches, 8 if metric == 'outquant' else None,
            axis, lambda_kl, temperature, layers=s['decoder_layers'],
            outputs=distillation_outputs if s['proposals'] else
            decoder_outputs, critical=critical)

    def on_sample(result: TraceResult) -> None:
        if path and is_main_process():
            save_cached(path, key, result)
        rel = result.rel_stderr()
        logger.info(
            f'sensitivity {metric}/{estimator}: sample {result.num_samples}, '
            f'median rel. SE {float(np.median(rel)):.3f}, max '
            f'{float(np.max(rel)):.3f}, {result.seconds:.1f} s')

    common = dict(tol=s['tol'], min_samples=s['min_samples'],
                  max_samples=s['max_samples'], seed=s['seed'],
                  result=previous, on_sample=on_sample, objective=metric,
                  shard=process_shard())
    index = list(range(len(batches)))
    try:
        with hessian_mode(model, weights):
            if estimator == 'gauss_newton':
                result = gauss_newton_traces(
                    weights, objective.gauss_newton_sample, index, **common)
            else:
                result = hutchinson_traces(
                    weights, objective.loss, index,
                    per_layer=estimator == 'hutchinson_per_layer', **common)
    finally:
        with torch.no_grad():
            for n, p in weights.items():
                p.copy_(float_state[n])
    result.meta.update(key=key, calibration_img_ids=calibration.img_ids)
    if path and is_main_process():
        save_cached(path, key, result)
    samples = np.asarray(result.samples)
    zero = {n: weights[n] for i, n in enumerate(result.names)
            if not samples[:, i].any()}
    if zero:
        low = settings.bit_range[0]
        result.meta['influence'] = output_influence(
            model, zero, decoder_outputs, batches[:INFLUENCE_BATCHES],
            lambda w: fake_quantize(w, low, axis))
    return result

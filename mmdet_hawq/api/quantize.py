"""``quantize()``: post-training weight quantization of a DETR-family
detector, in one call.

The steps, each in its own module: select the weights once
(:func:`~mmdet_hawq.quant.quantizable_weights`) → a plan: uniform, read from
a file, or traces (:mod:`.traces`) and the ILP (:mod:`.allocate`) → one
:func:`~mmdet_hawq.quant.apply_plan`, nearest or GPTQ as the plan's entries
say. The calibration set is built by the caller once and shared by the
traces, GPTQ's error ratios and GPTQ's rounding. Nothing here reads a
config or a Runner: the hook (:mod:`mmdet_hawq.engine.hooks`) turns its
config keys into :class:`~.settings.QuantSettings`, builds the calibration
set and writes the report.
"""
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch.nn as nn

from ..errors import HawqUserError
from ..models import class_activation, decoder_outputs, default_min_bits
from ..quant import (GptqResult, PrecisionPlan, QuantizedWeight, apply_plan,
                     bit_floors, list_weights, make_plan, plan_stats,
                     quantizable_weights, uniform_plan, validate_plan)
from ..quant.activations import ActivationRange
from ..quant.selection import weight_group
from ..sensitivity import (TraceResult, calibration_loader,
                           preprocess_batches)
from .activation_sites import quantize_activations
from .allocate import allocate
from .dist import run_on_main
from .critical import critical_indices
from .settings import CalibrationSettings, QuantSettings
from .traces import compute_traces, model_source

LOGGER = logging.getLogger('mmdet_hawq')


@dataclass
class Calibration:
    """A run's calibration images, chosen and preprocessed once and shared
    by the sensitivity step and GPTQ.

    Attributes:
        batches (list): Preprocessed batches (``inputs`` (B, 3, H, W) and
            ``data_samples``, on the model's device).
        img_ids (list): The images' ids (part of the trace cache key).
        classes (list[str]): The calibration dataset's class names.
    """

    batches: List[Any]
    img_ids: List[Any]
    classes: List[str]

    @classmethod
    def from_loader(cls, model: nn.Module, loader: Iterable,
                    img_ids: Optional[Sequence[Any]] = None,
                    classes: Optional[Sequence[str]] = None
                    ) -> 'Calibration':
        """The batches of any data loader of mmdet inputs (``inputs`` and
        ``data_samples``, e.g. collated by ``pseudo_collate``), run through
        ``model``'s data preprocessor once.

        Args:
            model (nn.Module): The detector (its data preprocessor, its
                device).
            loader (Iterable): The batches.
            img_ids (Sequence, optional): The images' ids (part of the
                trace cache key); None: each data sample's ``img_id``.
            classes (Sequence[str], optional): The class names; None: the
                loader's dataset's ``metainfo['classes']`` (through a
                ``Subset``).

        Returns:
            Calibration: The preprocessed set.
        """
        batches = preprocess_batches(model, loader)
        if img_ids is None:
            img_ids = [sample.metainfo.get('img_id')
                       for batch in batches
                       for sample in batch['data_samples']]
            if None in img_ids:  # the cache key would not tell sets apart
                raise HawqUserError(
                    'a calibration data sample has no img_id in its '
                    "metainfo: keep 'img_id' in PackDetInputs' meta_keys or "
                    'pass img_ids=[...] to Calibration.from_loader')
        if classes is None:
            dataset = getattr(loader, 'dataset', None)
            dataset = getattr(dataset, 'dataset', dataset)  # a Subset's
            classes = getattr(dataset, 'metainfo', {}).get('classes')
            if classes is None:
                raise HawqUserError(
                    'the calibration loader\'s dataset has no '
                    "metainfo['classes']: pass classes=[...] to "
                    'Calibration.from_loader')
        return cls(batches, list(img_ids), list(classes))

    @classmethod
    def from_dataset(cls, model: nn.Module, dataset: Any,
                     settings: Optional[CalibrationSettings] = None
                     ) -> 'Calibration':
        """``settings.num_images`` images of an mmdet dataset, chosen to
        match its class distribution as the hook does
        (:func:`~mmdet_hawq.sensitivity.calibration_loader`), preprocessed
        once.

        Args:
            model (nn.Module): The detector.
            dataset: An mmdet dataset that returns packed inputs (a test
                pipeline ending in ``PackDetInputs``).
            settings (CalibrationSettings, optional): How many images, the
                batch size and the seed. Defaults to the hook's defaults.
        """
        s = settings or CalibrationSettings()
        dataset.full_init()
        loader, indices = calibration_loader(dataset, s.num_images,
                                             s.batch_size, s.seed)
        return cls.from_loader(model, loader, [
            dataset.get_data_info(i)['img_id'] for i in indices])


@dataclass
class QuantResult:
    """What :func:`quantize` did.

    Attributes:
        plan (PrecisionPlan): Weight name → entry (bits, axis, rounding).
        quantized (dict[str, QuantizedWeight]): Codes and scale of every
            quantized weight (what a packed checkpoint stores).
        layers (list[dict]): One row per candidate weight, in model order:
            name, group, module type, shape, whether and why not quantized,
            bits, the rounding it got, trace and error-term columns.
        summary (dict): Run-level facts: metric, rounding, counts, average
            bits, weight bytes, timings (``calibration_seconds`` is the
            caller's), ``gptq`` settings when used.
        traces (TraceResult, optional): The sensitivity metrics' traces.
        sensitivity_report (dict, optional): Traces and Pareto curve for
            :func:`~mmdet_hawq.report.write_sensitivity_report`.
        activations (dict[str, ActivationRange], optional): Int8 site →
            the calibrated range its tensor is fake-quantized to (the hooks
            stay on the model), with the ``activations`` setting.
        activation_sites (list[dict], optional): One row per activation
            site: its precision, MACs, squared error and, with
            ``sensitivity``, trace and predicted damage.
    """

    plan: PrecisionPlan
    quantized: Dict[str, QuantizedWeight]
    layers: List[Dict[str, Any]]
    summary: Dict[str, Any]
    traces: Optional[TraceResult] = None
    sensitivity_report: Optional[Dict[str, Any]] = field(default=None,
                                                         repr=False)
    activations: Optional[Dict[str, ActivationRange]] = None
    activation_sites: Optional[List[Dict[str, Any]]] = None


def weight_floors(model: nn.Module, weights: Mapping[str, nn.Parameter],
                  settings: QuantSettings) -> Dict[str, int]:
    """``min_bits`` resolved per weight (by default the model's structural
    floors, :func:`~mmdet_hawq.models.default_min_bits`), checked against
    the budget.

    Raises:
        HawqUserError: The floors alone average more than ``target_bits``.
    """
    low, high = settings.bit_range
    if settings.min_bits is None:
        floors = {n: min(b, high) for n, b in
                  default_min_bits(model).items() if n in weights}
        what = ('the default floors of deformable attention (pass '
                'min_bits={} to drop them)')
    else:
        floors = bit_floors(list(weights), settings.min_bits)
        what = f'min_bits {settings.min_bits}'
    total = sum(p.numel() for p in weights.values())
    fewest = sum(p.numel() * max(low, floors.get(n, low))
                 for n, p in weights.items()) / total
    if fewest > settings.target_bits + 1e-9:
        raise HawqUserError(
            f'{what} alone average {fewest:.3f} bits, above '
            f'target_bits={settings.target_bits}: lower min_bits or raise '
            'target_bits')
    return floors


def check_model(model: nn.Module, settings: QuantSettings,
                classes: Optional[Sequence[str]] = None
                ) -> Dict[str, nn.Parameter]:
    """Every check of ``settings`` against the model that needs no data.

    The include/exclude patterns must select weights, the floors must fit
    the budget, a plan file must name exactly the selected weights, and the
    ``critical_classes`` must be among ``classes`` when these are known.

    Returns:
        dict[str, nn.Parameter]: The selected weights.

    Raises:
        HawqUserError: One line naming what is wrong and the fix.
    """
    weights = quantizable_weights(model, settings.include, settings.exclude)
    if settings.uses_traces:
        critical = settings.sensitivity.critical_classes
        if critical is not None and classes:
            critical_indices(critical, classes)
        weight_floors(model, weights, settings)
    if settings.plan is not None:
        validate_plan(settings.plan, weights, settings.plan_file)
    return weights


def quantize(model: nn.Module, calibration: Optional[Calibration],
             settings: QuantSettings,
             source: Optional[Mapping[str, Any]] = None,
             cache_dir: Optional[str] = None,
             logger: logging.Logger = LOGGER) -> QuantResult:
    """Quantize the weights of ``model`` in place as ``settings`` say.

    Args:
        model (nn.Module): A supported DETR-family detector (unwrapped),
            float weights, on any device.
        calibration (Calibration, optional): The calibration images; needed
            when ``settings.reads_calibration`` (a sensitivity metric, GPTQ
            rounding).
        settings (QuantSettings): The run's settings.
        source (Mapping, optional): ``model`` and ``checkpoint`` identities
            for the trace cache key. Defaults to None: a hash of the
            model's structure and weights (:func:`.traces.model_source`).
        cache_dir (str, optional): Where trace samples are saved when the
            ``cache_dir`` setting names none (the hook's ``<out_dir>/cache``);
            not saved when both are None or ``use_cache`` is False.
            Defaults to None.
        logger (logging.Logger): Progress lines and warnings. Defaults to
            the ``mmdet_hawq`` logger.

    Returns:
        QuantResult: Plan, codes, per-layer table, summary and traces.

    Raises:
        HawqUserError: A setting does not fit the model, or calibration
            images are needed and missing.
    """
    if settings.reads_calibration and calibration is None:
        raise HawqUserError(
            f'metric {settings.metric!r} with rounding {settings.rounding!r} '
            'reads calibration images: pass a Calibration')
    start = time.time()
    infos = list_weights(model, settings.include, settings.exclude)
    weights = quantizable_weights(model, settings.include, settings.exclude,
                                  infos)
    columns: Dict[str, Dict[str, Any]] = {}
    traces = report = None
    if settings.metric == 'uniform':
        plan = uniform_plan(weights, settings.bits, settings.axis,
                            settings.rounding)
    elif settings.metric == 'plan':
        plan = settings.plan
        validate_plan(plan, weights, settings.plan_file)
    else:
        floors = weight_floors(model, weights, settings)
        traces = compute_traces(
            model, weights, settings, calibration,
            source or model_source(model),
            settings.trace_cache(cache_dir), logger)
        alloc = run_on_main(allocate, model, weights, traces, settings,
                            floors, calibration.batches, logger)
        plan = make_plan(alloc.bits, settings.axis, settings.rounding)
        columns, report = alloc.columns, alloc.report
    plan_seconds = time.time() - start
    rounded = time.time()
    act = settings.activations
    # the float teacher of the activation traces (before the weights change)
    teacher = copy.deepcopy(model) if act and act.sensitivity else None
    applied = _apply(model, plan, calibration, settings, logger)
    rounding_seconds = time.time() - rounded
    ranges = sites = None
    if act is not None:
        ranges, sites = quantize_activations(
            model, list(applied.applied), calibration, act, teacher,
            settings.distillation(class_activation(model)), logger)
        del teacher
    for name, how in applied.rounding.items():
        columns.setdefault(name, {})['rounding'] = how
        if name in applied.notes:
            columns[name]['rounding_note'] = applied.notes[name]
    summary = dict(
        metric=settings.metric, per_channel=settings.per_channel,
        rounding=settings.rounding, num_weights=len(plan),
        num_quantized=len(applied.applied),
        seconds=round(time.time() - start, 2),
        plan_seconds=round(plan_seconds, 2),
        rounding_seconds=round(rounding_seconds, 2),
        **plan_stats(plan, {n: p.numel() for n, p in weights.items()}))
    if settings.rounding == 'gptq':
        summary['gptq'] = asdict(settings.gptq)
    if ranges is not None:
        summary['activations'] = dict(
            asdict(act), sites=len(sites), int8_sites=len(ranges))
    return QuantResult(plan, applied.applied, _rows(infos, plan, columns),
                       summary, traces, report, ranges, sites)


def _apply(model: nn.Module, plan: PrecisionPlan,
           calibration: Optional[Calibration], settings: QuantSettings,
           logger: logging.Logger) -> GptqResult:
    """:func:`~mmdet_hawq.quant.apply_plan` with GPTQ's progress and
    warnings logged."""
    start, shown = time.time(), [0]

    def progress(done: int, total: int) -> None:
        if 10 * done // total > shown[0] or done == total:
            shown[0] = 10 * done // total
            logger.info(f'gptq: {done}/{total} weights, '
                        f'{time.time() - start:.1f} s')

    batches = calibration.batches if calibration is not None else None
    result = apply_plan(model, plan, batches, decoder_outputs,
                        asdict(settings.gptq), progress)
    if settings.rounding != 'gptq':
        return result
    nearest = [n for n, r in result.rounding.items() if r == 'nearest']
    few = [n for n, note in result.notes.items()
           if 'calibration input rows' in note]
    if nearest:
        logger.info(
            f'gptq: {len(nearest)} weight(s) keep nearest rounding (see '
            f'the layer report), e.g. {nearest[:3]}')
    if few:
        logger.warning(
            f'gptq: the calibration set is too small for {len(few)} '
            f'weight(s): fewer input rows than H has columns, e.g. '
            f'{few[0]}: {result.notes[few[0]]}')
    logger.info(
        f'gptq: {len(result.rounding) - len(nearest)} weight(s) rounded '
        f'with GPTQ on {len(batches)} calibration batches in '
        f'{time.time() - start:.1f} s')
    return result


def _rows(infos: Sequence[Any], plan: PrecisionPlan,
          columns: Mapping[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The per-layer table: every candidate weight, in model order."""
    rows = []
    for info in infos:
        entry = plan.get(info.name)
        row = dict(
            name=info.name, group=weight_group(info.name),
            module_type=info.module_type, shape=list(info.shape),
            numel=info.numel, included=info.included, reason=info.reason,
            bits=entry.bits if entry is not None else None)
        row.update(columns.get(info.name, {}))
        rows.append(row)
    return rows

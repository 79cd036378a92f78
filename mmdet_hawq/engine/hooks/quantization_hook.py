"""``DistillSensitivityHook``: post-training weight quantization in mmdet.

The hook runs in ``before_test``, after the Runner has loaded the checkpoint
and before mmdet's test loop evaluates with the config's ``CocoMetric``. It
only orchestrates; each step lives in its own module:

1. unwrap the model (``is_model_wrapper``);
2. pick a precision plan: ``metric='uniform'`` (``bits`` everywhere),
   ``plan_file`` (a JSON plan), or a sensitivity metric (see
   :mod:`mmdet_hawq.engine.pipeline`);
3. fake-quantize the weights in place: nearest rounding
   (:func:`~mmdet_hawq.quant.apply_plan`, the paper's) or GPTQ on the same
   grid (:mod:`mmdet_hawq.engine.rounding`);
4. write the plan, the per-layer report, the summary and optionally a packed
   low-bit checkpoint to ``<work_dir>/<out_subdir>/``.

Before any work, ``before_run`` stops an unsupported detector (before the
checkpoint is loaded) and ``before_test`` checks the data files. An
unexpected exception in an entry point becomes a
:class:`~mmdet_hawq.errors.HawqInternalError` that names where it was raised
(mmengine's ``call_hook`` would hide a ``TypeError``'s traceback).
"""
import difflib
import inspect
import logging
import math
import os
import os.path as osp
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmdet.registry import HOOKS
from ...errors import (HawqUserError, report_internal_errors,
                       set_interrupt_note, terminate_as_interrupt)
from ...models import class_activation, default_min_bits, detector_family
from ...quant import (DEFAULT_EXCLUDE, apply_plan, bit_floors, check_bits,
                      check_plan_bits, list_weights, load_plan,
                      pack_state_dict, plan_stats, quantizable_weights,
                      save_plan, uniform_plan, validate_plan)
from ...quant.selection import weight_group
from ...report import (plot_bits, write_layer_report,
                       write_sensitivity_report)
from ...sensitivity import saved_samples_note
from ..checkpoint import check_finite, prepare_state_dict
from ..critical import critical_indices
from ..pipeline import (calibration_classes, calibration_set,
                        check_data_files, check_images, resolve_settings,
                        sensitivity_plan)
from ..rounding import gptq_error_scales, gptq_round, resolve_gptq

METRICS = ('uniform', 'plan', 'losssen', 'outfloat', 'outquant')


@HOOKS.register_module()
class DistillSensitivityHook(Hook):
    """Quantize the model's weights before the test loop.

    Args:
        metric (str): How bit-widths are chosen: ``'uniform'`` (``bits`` for
            every weight), ``'plan'`` (read ``plan_file``), ``'losssen'``
            (Hessian of the DETR loss), ``'outfloat'`` (distillation Hessian
            at the float weights) or ``'outquant'`` (distillation Hessian at
            the 8-bit weights, the paper's method). Works on every
            supported DETR-family detector (:mod:`mmdet_hawq.models.
            family`). Defaults to 'outquant'.
        bits (int, optional): Bit-width of ``'uniform'``. Defaults to None.
        plan_file (str, optional): JSON plan for ``'plan'``. Defaults to None.
        target_bits (float, optional): Average bit-width budget of the
            sensitivity metrics. Defaults to None.
        bit_range (Sequence[int]): Smallest and largest bit-width a layer may
            get. Defaults to (3, 6), the paper's range for 4 and 5 bits.
        sensitivity (dict, optional): Settings of the sensitivity analysis
            (estimator, calibration set, tolerances, ``critical_classes``:
            names of the dataset's classes the distillation KL term is
            restricted to); see :data:`mmdet_hawq.engine.pipeline.
            SENSITIVITY_DEFAULTS`. Defaults to None (the defaults there).
        include (Sequence[str], optional): Only weights matching these glob
            patterns are quantized. Defaults to None (all candidates).
        exclude (Sequence[str]): Glob patterns of weights kept in float on
            top of the head's final class and box FFNs, which always stay
            float (found by structure, see
            :mod:`mmdet_hawq.quant.selection`). Defaults to ().
        min_bits (dict, optional): Glob pattern (matched like ``include``) →
            the fewest bits the sensitivity metrics' ILP may give the weights
            it matches, e.g. ``{'backbone.*': 4}``; it replaces the default
            floors (``{}``: none). Defaults to None: the floors found from
            the model's structure, 3 bits for the sampling offsets and
            attention weights of deformable attention
            (:func:`~mmdet_hawq.models.default_min_bits`).
        per_channel (bool): Per-output-channel scales instead of the paper's
            per-tensor ones. Defaults to False.
        rounding (str): How weights are rounded to the grid: ``'nearest'``
            (the paper's) or ``'gptq'`` (second-order rounding from the
            calibration images' layer inputs, same grid and scales; see
            :mod:`mmdet_hawq.engine.rounding`). Defaults to 'nearest'.
        gptq (dict, optional): GPTQ settings (``damp``, ``act_order``,
            ``block_size``, ``sequential``, ``stage_size``, and
            ``error_terms``: ``'gptq'`` scales the ILP's error terms by
            GPTQ's output-error ratio per bit-width); see
            :data:`mmdet_hawq.engine.rounding.GPTQ_DEFAULTS`. Only with
            ``rounding='gptq'``. Defaults to None (the defaults there).
        save_packed (bool): Also save a packed low-bit checkpoint.
            Defaults to True.
        out_subdir (str): Folder under the work dir for the outputs.
            Defaults to 'hawq'.
        **unknown: Rejected with one line naming the closest valid argument
            (a typo such as ``target_bit=5`` would otherwise be a
            traceback).
    """

    priority = 'LOW'

    def __init__(self,
                 metric: str = 'outquant',
                 bits: Optional[int] = None,
                 plan_file: Optional[str] = None,
                 target_bits: Optional[float] = None,
                 bit_range: Sequence[int] = (3, 6),
                 sensitivity: Optional[dict] = None,
                 include: Optional[Sequence[str]] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 min_bits: Optional[Dict[str, int]] = None,
                 per_channel: bool = False,
                 rounding: str = 'nearest',
                 gptq: Optional[dict] = None,
                 save_packed: bool = True,
                 out_subdir: str = 'hawq',
                 **unknown: Any) -> None:
        if unknown:
            raise HawqUserError(unknown_argument(sorted(unknown)[0]))
        bit_range = check_bit_range(bit_range)
        if metric not in METRICS:
            raise HawqUserError(
                f'DistillSensitivityHook: metric {metric!r} is unknown: use '
                f'one of {", ".join(METRICS)}')
        if metric == 'uniform':
            if bits is None:
                raise HawqUserError(
                    "DistillSensitivityHook: metric='uniform' needs bits=N "
                    '(2 to 8)')
            check_bits(bits, 'DistillSensitivityHook bits')
        if metric == 'plan' and not plan_file:
            raise HawqUserError(
                "DistillSensitivityHook: metric='plan' needs plan_file=PATH")
        if metric == 'plan':  # read now: before the Runner builds any data
            check_plan_bits(load_plan(plan_file), plan_file)
        if metric in ('losssen', 'outfloat', 'outquant'):
            if target_bits is None:
                raise HawqUserError(
                    f"DistillSensitivityHook: metric='{metric}' needs "
                    'target_bits (the average bit-width budget)')
            lo, hi = bit_range
            check_bits(lo, 'bit_range low end')
            check_bits(hi, 'bit_range high end')
            if lo > hi:
                raise HawqUserError(
                    f'DistillSensitivityHook: bit_range {tuple(bit_range)} '
                    'is empty: give (low, high) with low <= high')
            check_budget(target_bits, lo, hi)
            # the option values, before the Runner builds any dataset
            resolve_settings(metric, sensitivity)
        check_min_bits(min_bits, metric, tuple(bit_range))
        self.gptq = resolve_gptq(rounding, gptq)
        if rounding == 'gptq' and metric in ('uniform', 'plan'):
            resolve_settings('outquant', sensitivity)  # GPTQ's calibration
        self.rounding = rounding
        self.metric = metric
        self.bits = bits
        self.plan_file = plan_file
        self.target_bits = target_bits
        self.bit_range = tuple(bit_range)
        self.sensitivity = dict(sensitivity or {})
        self.include = include
        self.exclude = tuple(exclude)
        self.min_bits = None if min_bits is None else dict(min_bits)
        self.axis = 0 if per_channel else None
        self.save_packed = save_packed
        self.out_subdir = out_subdir
        self.summary: Dict = {}

    @report_internal_errors
    def before_run(self, runner) -> None:
        """Stop an unsupported detector before the checkpoint is loaded
        (one line, instead of a key mismatch with a DETR checkpoint)."""
        detector_family(unwrap(runner.model))

    @report_internal_errors
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Make the Runner's checkpoint load strict, before it loads.

        An official facebookresearch/detr checkpoint is converted in place;
        keys and shapes must then be exactly the model's, or one
        :class:`~mmdet_hawq.errors.HawqUserError` names what differs (see
        :func:`~mmdet_hawq.engine.checkpoint.prepare_state_dict`).
        """
        prepare_state_dict(unwrap(runner.model), checkpoint,
                           runner.cfg.get('load_from'))

    def check_model(self, model: torch.nn.Module,
                    source: Optional[str] = None,
                    classes: Optional[Sequence[str]] = None) -> None:
        """Every check on the model that needs no data, before any data.

        The include/exclude patterns must select weights, those weights
        must be finite, the sensitivity settings must be known (the
        ``critical_classes`` among ``classes`` when these are known), and a
        plan file must fit the weights.

        Args:
            model (nn.Module): The detector with its weights (unwrapped).
            source (str, optional): Where the weights come from, for the
                message. Defaults to None.
            classes (Sequence[str], optional): The class names the
                calibration dataset's config declares
                (:func:`~mmdet_hawq.engine.pipeline.calibration_classes`).
                Defaults to None (checked when the dataset is built).

        Raises:
            HawqUserError: One line naming what is wrong and the fix.
        """
        weights = quantizable_weights(model, self.include, self.exclude)
        what = 'the weights to quantize' + (
            f' (from {source!r})' if source else '')
        check_finite({n: p.data for n, p in weights.items()}, what)
        if self.metric not in ('uniform', 'plan'):
            s = resolve_settings(self.metric, self.sensitivity,
                                 class_activation(model))
            if s['critical_classes'] is not None and classes:
                critical_indices(s['critical_classes'], classes)
            self._floors(model, weights)
        if self.metric == 'plan':
            validate_plan(load_plan(self.plan_file), weights, self.plan_file)

    def _floors(self, model: torch.nn.Module,
                weights: Dict[str, torch.nn.Parameter]) -> Dict[str, int]:
        """``min_bits`` resolved per weight (by default the model's
        structural floors, :func:`~mmdet_hawq.models.default_min_bits`),
        checked against the budget."""
        low, high = self.bit_range
        if self.min_bits is None:
            floors = {n: min(b, high) for n, b in
                      default_min_bits(model).items() if n in weights}
            what = ('the default floors of deformable attention (pass '
                    'min_bits={} to drop them)')
        else:
            floors = bit_floors(list(weights), self.min_bits)
            what = f'min_bits {self.min_bits}'
        total = sum(p.numel() for p in weights.values())
        fewest = sum(p.numel() * max(low, floors.get(n, low))
                     for n, p in weights.items()) / total
        if fewest > self.target_bits + 1e-9:
            raise HawqUserError(
                f'DistillSensitivityHook: {what} alone average '
                f'{fewest:.3f} bits, above target_bits={self.target_bits}: '
                'lower min_bits or raise target_bits')
        return floors

    def declared_classes(self, cfg) -> Optional[List[str]]:
        """The classes the calibration dataset's config declares, for the
        ``critical_classes`` check (None for the metrics without
        traces)."""
        if self.metric in ('uniform', 'plan'):
            return None
        return calibration_classes(cfg, self.sensitivity)

    def reads_calibration(self) -> bool:
        """Whether the hook reads calibration images (the sensitivity
        metrics, GPTQ rounding)."""
        return self.metric not in ('uniform', 'plan') or \
            self.rounding == 'gptq'

    def check_data(self, cfg) -> None:
        """The annotation files and image folders the run reads exist (the
        test split's, and the calibration set's when the hook reads one);
        no data is loaded.

        Args:
            cfg (mmengine.Config): The run's config.

        Raises:
            HawqUserError: One line naming the missing file or folder.
        """
        check_data_files(cfg, self.sensitivity
                         if self.reads_calibration() else None)

    @report_internal_errors
    def before_test(self, runner) -> None:
        """Quantize ``runner.model`` in place and write the reports.

        Checks first, before any work: the model (:meth:`check_model`), the
        data files (:meth:`check_data`) and the test split's first image.
        The warnings logged while quantizing are repeated in the summary.
        """
        model = unwrap(runner.model)
        self.check_model(model, runner.cfg.get('load_from'),
                         self.declared_classes(runner.cfg))
        self.check_data(runner.cfg)
        test_set = runner.test_dataloader.dataset
        check_images(test_set, range(min(1, len(test_set))), 'test split')
        with logged_warnings(runner.logger) as warned:
            self._quantize(runner, model, warned)

    def _quantize(self, runner, model: torch.nn.Module,
                  warned: List[str]) -> None:
        """Plan, round and report (:meth:`before_test` after its checks);
        ``warned``, filled with the warnings logged meanwhile, goes into the
        summary."""
        out_dir = osp.join(runner.work_dir, self.out_subdir)
        os.makedirs(out_dir, exist_ok=True)
        start = time.time()
        weights = quantizable_weights(model, self.include, self.exclude)
        rows_extra: Dict[str, Dict] = {}
        sens_report: Optional[Dict] = None
        if self.metric not in ('uniform', 'plan') and self.sensitivity.get(
                'use_cache', True):
            cache_dir = self.sensitivity.get('cache_dir') or osp.join(
                out_dir, 'cache')
            set_interrupt_note(lambda: saved_samples_note(cache_dir))
        elif self.metric not in ('uniform', 'plan'):
            set_interrupt_note(lambda: (
                'the sensitivity cache is off (use_cache=False), nothing '
                'was saved; rerun the same command to start again'))
        # one calibration set for the traces and GPTQ; its time is the
        # sensitivity step's when there is one, else the rounding's
        calib_start = time.time()
        calib = calibration_set(runner.cfg, model, self.sensitivity) \
            if self.reads_calibration() else None
        calib_seconds = time.time() - calib_start
        rounding_start = time.time()
        batches = calib.batches if self.rounding == 'gptq' else None
        scale = None
        if batches is not None and self.gptq['error_terms'] == 'gptq' and \
                self.metric not in ('uniform', 'plan'):
            scale = gptq_error_scales(
                runner, model, list(weights),
                range(self.bit_range[0], self.bit_range[1] + 1), self.axis,
                batches, self.gptq)
        rounding_seconds = time.time() - rounding_start
        plan_start = time.time()
        if self.metric == 'uniform':
            plan = uniform_plan(weights, self.bits)
        elif self.metric == 'plan':
            plan = load_plan(self.plan_file)
        else:
            # SIGTERM too ends in one line (under mmdet's test.py as well)
            with terminate_as_interrupt():
                plan, rows_extra, sens_report = sensitivity_plan(
                    runner, model, weights, self.metric, self.target_bits,
                    self.bit_range, self.axis, self.sensitivity, out_dir,
                    calib, self._floors(model, weights), scale)
        plan_seconds = time.time() - plan_start
        if self.metric in ('uniform', 'plan'):
            rounding_seconds += calib_seconds
        else:
            plan_seconds += calib_seconds
        rounding_start = time.time()
        quantized = self._round(runner, model, plan, weights, batches,
                                rows_extra)
        rounding_seconds += time.time() - rounding_start
        numels = {n: p.numel() for n, p in weights.items()}
        stats = plan_stats(plan, numels)
        # plan: traces and ILP; rounding: GPTQ's calibration batches, error
        # ratios and codes (or nearest rounding)
        self.summary = dict(
            metric=self.metric, per_channel=self.axis is not None,
            rounding=self.rounding, num_weights=len(plan),
            num_quantized=len(quantized),
            seconds=round(time.time() - start, 2),
            plan_seconds=round(plan_seconds, 2),
            rounding_seconds=round(rounding_seconds, 2), warnings=warned,
            **stats)
        if self.rounding == 'gptq':
            self.summary['gptq'] = dict(self.gptq)
        if is_main_process():
            self._write_outputs(model, out_dir, weights, quantized, plan,
                                rows_extra, stats)
            if sens_report is not None:
                write_sensitivity_report(out_dir, **sens_report)
        runner.logger.info(
            f'DistillSensitivityHook: {self.metric}: {len(quantized)} of '
            f'{len(plan)} weights quantized, {stats["avg_bits"]:.3f} bits on '
            f'average, {stats["weight_bytes"] / 2**20:.2f} MiB of weights '
            f'(fp32: {stats["fp32_bytes"] / 2**20:.2f} MiB); outputs in '
            f'{out_dir}')

    def _round(self, runner, model: torch.nn.Module,
               plan: Dict[str, Optional[int]],
               weights: Dict[str, torch.nn.Parameter],
               batches: Optional[List[Any]],
               rows_extra: Dict[str, Dict]) -> Dict[str, Any]:
        """Fake-quantize the plan in place, nearest or GPTQ; the rounding
        of each weight (and any note) goes into ``rows_extra``."""
        if self.rounding == 'nearest':
            return apply_plan(model, plan, self.axis, self.include,
                              self.exclude)
        validate_plan(plan, weights)
        result = gptq_round(runner, model, plan, self.axis, batches,
                            self.gptq)
        for name, how in result.rounding.items():
            row = rows_extra.setdefault(name, {})
            row['rounding'] = how
            if name in result.notes:
                row['rounding_note'] = result.notes[name]
        return result.applied

    def _write_outputs(self, model, out_dir: str,
                       weights: Dict[str, torch.nn.Parameter],
                       quantized: Sequence[str], plan: Dict[str, int],
                       rows_extra: Dict[str, Dict], stats: Dict) -> None:
        """Packed checkpoint, plan, per-layer report and figure (rank 0)."""
        if self.save_packed:
            path = osp.join(out_dir, 'packed.pth')
            torch.save(pack_state_dict(model, quantized, plan), path)
            self.summary['packed_file'] = path
            self.summary['packed_bytes'] = osp.getsize(path)
        save_plan(plan, osp.join(out_dir, 'plan.json'))
        rows = self._rows(model, plan, rows_extra)
        write_layer_report(out_dir, rows, self.summary)
        names = list(weights)
        plot_bits(osp.join(out_dir, 'bits_per_layer.png'), names,
                  {self.metric: plan},
                  title=f'Bits per layer ({self.metric}, '
                  f'{stats["avg_bits"]:.2f} bits on average)')

    def _rows(self, model, plan: Dict[str, Optional[int]],
              extra: Dict[str, Dict]) -> List[Dict]:
        rows = []
        for info in list_weights(model, self.include, self.exclude):
            row = dict(
                name=info.name, group=weight_group(info.name),
                module_type=info.module_type, shape=list(info.shape),
                numel=info.numel, included=info.included,
                reason=info.reason, bits=plan.get(info.name))
            row.update(extra.get(info.name, {}))
            rows.append(row)
        return rows


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a model wrapper (DDP), or ``model`` itself."""
    return model.module if is_model_wrapper(model) else model


class _WarningLog(logging.Handler):
    """Keeps the messages of the warnings a logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record``'s message."""
        self.messages.append(record.getMessage())


@contextmanager
def logged_warnings(logger: logging.Logger) -> Iterator[List[str]]:
    """The messages of the warnings ``logger`` emits inside the block.

    Args:
        logger (logging.Logger): E.g. the Runner's logger.

    Yields:
        list[str]: Filled as warnings are logged.
    """
    handler = _WarningLog()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def hook_arguments() -> List[str]:
    """The names :class:`DistillSensitivityHook` takes."""
    params = inspect.signature(DistillSensitivityHook.__init__).parameters
    return [n for n, p in params.items()
            if n != 'self' and p.kind is not p.VAR_KEYWORD]


def unknown_argument(name: str) -> str:
    """The message for an unknown hook argument: the closest valid name and
    all of them."""
    valid = hook_arguments()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f'did you mean {close[0]!r}? ' if close else ''
    return (f'DistillSensitivityHook: unknown argument {name!r}: {hint}'
            f'the valid ones are {", ".join(valid)}')


def check_min_bits(min_bits: Optional[Dict[str, int]], metric: str,
                   bit_range: Tuple[int, int]) -> None:
    """Raise unless ``min_bits`` maps patterns to bit-widths inside
    ``bit_range``, for a metric that allocates bits."""
    if not min_bits:
        return
    if metric in ('uniform', 'plan'):
        raise HawqUserError(
            f'DistillSensitivityHook: min_bits bounds the ILP of the '
            f"sensitivity metrics; metric='{metric}' has none: drop min_bits "
            "or use metric='outquant'")
    if not isinstance(min_bits, dict):
        raise HawqUserError(
            f'DistillSensitivityHook: min_bits {min_bits!r} is not a dict: '
            "give {pattern: bits}, e.g. {'backbone.*': 4}")
    low, high = bit_range
    for pattern, bits in min_bits.items():
        if not isinstance(pattern, str) or isinstance(bits, bool) or \
                not isinstance(bits, int) or not low <= bits <= high:
            raise HawqUserError(
                f'DistillSensitivityHook: min_bits entry {pattern!r}: '
                f'{bits!r} is not a bit-width in bit_range {bit_range}: give '
                f'a weight pattern and an int from {low} to {high}')


def check_bit_range(bit_range: Any) -> Tuple[Any, Any]:
    """``bit_range`` as ``(low, high)``, or one line saying it is not a
    pair (each end is checked by :func:`~mmdet_hawq.quant.check_bits`).

    Args:
        bit_range (Any): The hook's ``bit_range`` argument.

    Returns:
        tuple: (low, high).
    """
    if isinstance(bit_range, (str, bytes)) or not isinstance(
            bit_range, Sequence) or len(bit_range) != 2:
        raise HawqUserError(
            f'DistillSensitivityHook: bit_range {bit_range!r} is not a '
            'pair: give (low, high), e.g. (3, 6)')
    return bit_range[0], bit_range[1]


def check_budget(target_bits: float, low: int, high: int) -> None:
    """Raise unless ``target_bits`` is a number the bit range can meet."""
    if isinstance(target_bits, bool) or not isinstance(
            target_bits, (int, float)) or not math.isfinite(target_bits):
        raise HawqUserError(
            f'DistillSensitivityHook: target_bits {target_bits!r} is not a '
            'finite number: give the average bit-width budget, e.g. 4 or 4.5')
    if target_bits < low:
        raise HawqUserError(
            f'DistillSensitivityHook: target_bits={target_bits} is below '
            f'the lowest bit-width of bit_range=({low}, {high}): no plan '
            f'can average {target_bits} bits; raise target_bits to at least '
            f'{low} or lower the bit_range low end')

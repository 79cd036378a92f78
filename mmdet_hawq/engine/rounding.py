"""How the hook rounds weights to the plan's grid: nearest (the paper) or
GPTQ (:mod:`mmdet_hawq.quant.gptq`), and GPTQ-aware error terms for the ILP.

GPTQ reads the sensitivity step's calibration set, built once per run
(:func:`~mmdet_hawq.engine.pipeline.calibration_set`: the ``sensitivity``
settings ``num_images``, ``batch_size``, ``seed`` and ``dataset``), run
through the whole detector
(:func:`~mmdet_hawq.models.decoder_outputs`). In a distributed run every rank
rounds the same weights from all calibration batches, so every rank ends
with the same codes.
"""
import time
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn

from ..errors import HawqUserError
from ..models import decoder_outputs
from ..quant import GptqResult, gptq_apply, gptq_error_ratios

ROUNDINGS = ('nearest', 'gptq')
#: Defaults of the hook's ``gptq`` dict.
GPTQ_DEFAULTS = dict(
    damp=0.01,  # λ = damp · mean(diag H) added to the diagonal
    act_order=False,  # columns by descending diag(H)
    block_size=128,  # columns per lazy-update block (same codes)
    sequential=False,  # True: each weight's H from the partly quantized
    #                    model (one pass per stage; as good and 4-23x
    #                    slower on the small models, see the README)
    stage_size=1,  # weights per pass over the calibration set
    error_terms='nearest',  # ILP error terms: 'nearest' (||Q_b(W) - W||²)
    #                         or 'gptq' (times GPTQ's output-error ratio)
)
ERROR_TERMS = ('nearest', 'gptq')


def resolve_gptq(rounding: str, settings: Optional[dict]) -> dict:
    """The hook's ``gptq`` settings merged with :data:`GPTQ_DEFAULTS`.

    Args:
        rounding (str): ``'nearest'`` or ``'gptq'``.
        settings (dict, optional): The user's GPTQ settings; only with
            ``rounding='gptq'``. Defaults to None.

    Returns:
        dict: Every setting, checked.

    Raises:
        HawqUserError: An unknown rounding, setting or value.
    """
    if rounding not in ROUNDINGS:
        raise HawqUserError(
            f'DistillSensitivityHook: rounding {rounding!r} is unknown: use '
            f'one of {", ".join(ROUNDINGS)}')
    if settings and rounding != 'gptq':
        raise HawqUserError(
            "DistillSensitivityHook: gptq settings are given but rounding is "
            f"{rounding!r}: pass rounding='gptq' or drop gptq")
    s = dict(GPTQ_DEFAULTS)
    unknown = set(settings or {}) - set(s)
    if unknown:
        raise HawqUserError(
            f'DistillSensitivityHook: unknown gptq setting(s) '
            f'{sorted(unknown)}: the known ones are {sorted(s)}')
    s.update(settings or {})
    if s['error_terms'] not in ERROR_TERMS:
        raise HawqUserError(
            f"DistillSensitivityHook: gptq error_terms {s['error_terms']!r} "
            f'is unknown: use one of {", ".join(ERROR_TERMS)}')
    for key in ('block_size', 'stage_size'):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or \
                s[key] < 1:
            raise HawqUserError(
                f'DistillSensitivityHook: gptq {key} {s[key]!r} is not a '
                'positive int')
    if isinstance(s['damp'], bool) or not isinstance(
            s['damp'], (int, float)) or not 0 <= s['damp'] < 1:
        raise HawqUserError(
            f"DistillSensitivityHook: gptq damp {s['damp']!r} is not a "
            'number in [0, 1): GPTQ uses 0.01')
    return s


def gptq_error_scales(runner, model: nn.Module, names: Sequence[str],
                      bits: Sequence[int], axis: Optional[int],
                      batches: Sequence[Any],
                      settings: dict) -> Dict[str, Dict[int, float]]:
    """GPTQ's layer-output error over nearest rounding's, per weight and
    bit-width (:func:`~mmdet_hawq.quant.gptq_error_ratios`), from the float
    model; the ILP multiplies its error terms by these."""
    start = time.time()
    ratios = gptq_error_ratios(
        model, names, bits, batches, decoder_outputs, axis,
        settings['damp'], settings['act_order'], settings['block_size'])
    runner.logger.info(
        f'gptq: output-error ratios of {len(names)} weights at bits '
        f'{list(bits)} in {time.time() - start:.1f} s')
    return ratios


def gptq_round(runner, model: nn.Module, plan: Dict[str, Optional[int]],
               axis: Optional[int], batches: Sequence[Any],
               settings: dict) -> GptqResult:
    """Fake-quantize ``plan`` in place with GPTQ codes and log what fell
    back to nearest rounding or had too few calibration rows."""
    start = time.time()
    shown = [0]

    def progress(done: int, total: int) -> None:
        if 10 * done // total > shown[0] or done == total:
            shown[0] = 10 * done // total
            runner.logger.info(f'gptq: {done}/{total} weights, '
                               f'{time.time() - start:.1f} s')

    result = gptq_apply(
        model, plan, batches, decoder_outputs, axis, settings['damp'],
        settings['act_order'], settings['block_size'],
        settings['sequential'], settings['stage_size'], progress)
    nearest = [n for n, r in result.rounding.items() if r == 'nearest']
    few = [n for n, note in result.notes.items() if 'calibration input rows'
           in note]
    if nearest:
        runner.logger.info(
            f'gptq: {len(nearest)} weight(s) keep nearest rounding (see '
            f'the layer report), e.g. {nearest[:3]}')
    if few:
        runner.logger.warning(
            f'gptq: the calibration set is too small for {len(few)} '
            f'weight(s): fewer input rows than H has columns, e.g. '
            f'{few[0]}: {result.notes[few[0]]}')
    runner.logger.info(
        f'gptq: {len(result.rounding) - len(nearest)} weight(s) rounded '
        f'with GPTQ on {len(batches)} calibration batches in '
        f'{time.time() - start:.1f} s')
    return result

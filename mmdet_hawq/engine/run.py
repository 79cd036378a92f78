"""A quantization run inside an mmengine Runner: the checks before any
data, the calibration set, :func:`~mmdet_hawq.api.quantize` and the
outputs. The hook (:class:`~.hooks.DistillSensitivityHook`) and the tools
that quantize many variants in one Runner (``experiments/table1.py``) call
it.
"""
import logging
import os.path as osp
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch.nn as nn
from mmengine.dist import is_main_process
from mmengine.model import is_model_wrapper

from ..api import (Calibration, QuantResult, QuantSettings, check_model,
                   quantize)
from ..errors import set_interrupt_note, terminate_as_interrupt
from ..report import write_run
from ..sensitivity import file_sha256, key_hash, saved_samples_note
from .calibration import (calibration_classes, calibration_set,
                          check_data_files)
from .checkpoint import check_finite


def quantize_in_runner(runner, settings: QuantSettings, out_dir: str,
                       save_packed: bool = True,
                       calibration: Optional[Calibration] = None
                       ) -> QuantResult:
    """:func:`~mmdet_hawq.api.quantize` on ``runner.model`` with the run's
    calibration set, trace cache (``<out_dir>/cache`` unless the
    ``cache_dir`` setting says otherwise) and logger; the outputs written
    to ``out_dir`` on rank 0.

    Args:
        runner (mmengine.runner.Runner): The run, checkpoint loaded.
        settings (QuantSettings): The run's settings.
        out_dir (str): Where the outputs go.
        save_packed (bool): Also save a packed checkpoint. Defaults to True.
        calibration (Calibration, optional): A calibration set already
            built with ``settings.calibration`` (e.g. shared by the rows of
            a table). Defaults to None: built here when needed.

    Returns:
        QuantResult: With ``calibration_seconds`` and ``warnings`` (the
        warnings logged meanwhile) in its summary.
    """
    model, cfg, s = unwrap(runner.model), runner.cfg, settings
    cache_dir = s.trace_cache(osp.join(out_dir, 'cache'))
    if s.uses_traces:
        set_interrupt_note(
            (lambda: saved_samples_note(cache_dir)) if cache_dir else
            (lambda: 'the sensitivity cache is off (use_cache=False), '
             'nothing was saved; rerun the same command to start again'))
    with logged_warnings(runner.logger) as warned:
        start = time.time()
        if calibration is None and s.reads_calibration:
            calibration = calibration_set(cfg, model, s.calibration)
        seconds = time.time() - start
        with terminate_as_interrupt():  # SIGTERM too ends in one line
            result = quantize(model, calibration, s, config_source(cfg),
                              cache_dir, runner.logger)
    result.summary.update(calibration_seconds=round(seconds, 2),
                          warnings=warned)
    if is_main_process():
        write_run(out_dir, model, result, save_packed)
    stats = result.summary
    runner.logger.info(
        f'mmdet-hawq: {s.metric}: {stats["num_quantized"]} of '
        f'{stats["num_weights"]} weights quantized, {stats["avg_bits"]:.3f} '
        f'bits on average, {stats["weight_bytes"] / 2**20:.2f} MiB of '
        f'weights (fp32: {stats["fp32_bytes"] / 2**20:.2f} MiB); outputs '
        f'in {out_dir}')
    return result


def config_source(cfg: Any) -> Dict[str, Optional[str]]:
    """What identifies the model of a config in the trace cache key: a
    hash of its ``model`` config and the checkpoint file's SHA-256."""
    ckpt = cfg.get('load_from')
    return dict(model=key_hash(cfg.model.to_dict()),
                checkpoint=file_sha256(ckpt)
                if ckpt and osp.isfile(ckpt) else None)


def check_run(settings: QuantSettings, model: nn.Module, cfg: Any,
              source: Optional[str] = None) -> None:
    """Every check of a run before any data is loaded: the selected
    weights are finite, the settings fit the model
    (:func:`~mmdet_hawq.api.check_model`, the critical classes among those
    the calibration dataset's config declares), and the data files the run
    reads exist.

    Args:
        settings (QuantSettings): The run's settings.
        model (nn.Module): The detector with its weights (unwrapped).
        cfg (mmengine.Config): The run's config.
        source (str, optional): Where the weights come from, for the
            message. Defaults to the config's ``load_from``.

    Raises:
        HawqUserError: One line naming what is wrong and the fix.
    """
    source = source or cfg.get('load_from')
    weights = check_model(model, settings, calibration_classes(
        cfg, settings.calibration) if settings.uses_traces else None)
    check_finite({n: p.data for n, p in weights.items()},
                 'the weights to quantize' +
                 (f' (from {source!r})' if source else ''))
    check_data_files(cfg, settings.calibration
                     if settings.reads_calibration else None)


def unwrap(model: nn.Module) -> nn.Module:
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
    """The messages of the warnings ``logger`` emits inside the block."""
    handler = _WarningLog()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)

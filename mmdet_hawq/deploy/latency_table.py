"""A latency table of the activation sites, measured on a runtime, as
HAWQ-V3 measures one per layer and bit-width.

:func:`layer_latency_gains` exports the model with every site int8, then
once per layer with that layer's sites float, and times them all
interleaved (:func:`~.timing.time_models`): a layer's gain is the time its
going int8 saves, ``t(layer float) − t(all int8)``. The site program
(:func:`~mmdet_hawq.allocation.sites.fastest_int8_sites`) can then trade
predicted damage against that measured time in place of the MACs.
"""
import os.path as osp
from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np
import torch.nn as nn

from ..quant.activations import ActivationRange
from .onnx_export import export_onnx
from .timing import time_models

__all__ = ['export_plan', 'layer_latency_gains']


def export_plan(detector: nn.Module, out_file: str,
                input_shape: Tuple[int, int],
                packed: Mapping[str, Mapping],
                ranges: Mapping[str, ActivationRange],
                layer_of: Mapping[str, str],
                int8_layers: Sequence[str]) -> str:
    """Export ``detector`` with the sites of ``int8_layers`` int8 and every
    other site float; returns ``out_file``."""
    keep = set(int8_layers)
    export_onnx(detector, out_file, input_shape, packed=packed,
                activations={n: r for n, r in ranges.items()
                             if layer_of[n] in keep})
    return out_file


def layer_latency_gains(detector: nn.Module,
                        input_shape: Tuple[int, int],
                        packed: Mapping[str, Mapping],
                        ranges: Mapping[str, ActivationRange],
                        layer_of: Mapping[str, str],
                        images: Sequence[np.ndarray],
                        work_dir: str,
                        runtime: str = 'openvino',
                        threads: int = 1,
                        rounds: int = 3,
                        options: Mapping[str, Any] = None
                        ) -> Dict[str, Any]:
    """Each layer's measured time saved by its sites going int8.

    Args:
        detector (nn.Module): The detector with its (fake-quantized)
            weights.
        input_shape (tuple[int, int]): ``(H, W)`` of the export.
        packed (Mapping[str, Mapping]): Its packed weights.
        ranges (Mapping[str, ActivationRange]): Every site's range.
        layer_of (Mapping[str, str]): Site → its layer.
        images (Sequence[np.ndarray]): Timed inputs (1, 3, H, W).
        work_dir (str): Where the exports go.
        runtime (str): The runtime measured. Defaults to ``'openvino'``.
        threads (int): Threads of one inference. Defaults to 1.
        rounds (int): Interleaved rounds. Defaults to 3.
        options (Mapping, optional): The runtime's settings.

    Returns:
        dict: ``gains_ms`` (layer → median time saved, ms),
        ``all_int8_ms``, ``all_float_ms`` (no activation site int8) and
        ``latency`` (every model's :func:`~.timing.time_models` record).
    """
    layers = sorted(set(layer_of[n] for n in ranges))
    files = {'all_int8': export_plan(
        detector, osp.join(work_dir, 'all_int8.onnx'), input_shape, packed,
        ranges, layer_of, layers)}
    files['all_float'] = export_plan(
        detector, osp.join(work_dir, 'all_float.onnx'), input_shape, packed,
        ranges, layer_of, [])
    for i, layer in enumerate(layers):
        files[layer] = export_plan(
            detector, osp.join(work_dir, f'layer_{i:03d}.onnx'), input_shape,
            packed, ranges, layer_of, [g for g in layers if g != layer])
    latency = time_models({k: (f, runtime, dict(options or {}))
                           for k, f in files.items()}, images, threads,
                          rounds, warmup=1)
    base = latency['all_int8']['median_ms']
    return dict(gains_ms={g: latency[g]['median_ms'] - base
                          for g in layers},
                all_int8_ms=base,
                all_float_ms=latency['all_float']['median_ms'],
                latency=latency)

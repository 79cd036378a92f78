"""Running an exported detector under ONNX Runtime, and what ONNX Runtime
does with its ``DequantizeLinear`` nodes.

:class:`OnnxDetector` runs a model written by
:func:`~mmdet_hawq.deploy.onnx_export.export_onnx` on one image;
:func:`detections_from_outputs` passes its outputs through the detector
head's own ``predict_by_feat`` (mmdet's post-processing), so the detections
can be scored by mmdet's ``CocoMetric`` like the PyTorch model's.
"""
import collections
import os.path as osp
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto

from ..errors import HawqUserError
from ..models.family import predict_from_outputs

__all__ = [
    'FOLD_DEQUANTIZE_KEY', 'OnnxDetector', 'dequantize_behaviour',
    'detections_from_outputs', 'make_session'
]

#: ONNX Runtime session option that lets constant folding dequantize
#: constant ``DequantizeLinear`` inputs at session start (and turns off its
#: QDQ fusions); by default it is ``'0'`` and they run at every inference.
FOLD_DEQUANTIZE_KEY = 'session.disable_quant_qdq'


def make_session(model_file: str,
                 threads: int = 1,
                 level: str = 'all',
                 fold_dequantize: bool = False,
                 optimized_file: Optional[str] = None) -> Any:
    """An ONNX Runtime CPU session.

    Args:
        model_file (str): The ``.onnx`` file.
        threads (int): Intra-op threads (inter-op: 1). Defaults to 1.
        level (str): Graph optimisation level: ``'disable'``, ``'basic'``,
            ``'extended'`` or ``'all'``. Defaults to ``'all'``.
        fold_dequantize (bool): Set :data:`FOLD_DEQUANTIZE_KEY` to ``'1'``,
            so constant weights are dequantized to float once, at session
            start. Defaults to False (ONNX Runtime's default).
        optimized_file (str, optional): Write the optimised graph here.
            Defaults to None.

    Returns:
        onnxruntime.InferenceSession: The session.

    Raises:
        HawqUserError: The file is missing or not a model ONNX Runtime can
            load.
    """
    import onnxruntime as ort
    if not osp.isfile(model_file):
        raise HawqUserError(
            f'ONNX model {model_file!r} does not exist: pass a file written '
            'by tools/export_onnx.py')
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.graph_optimization_level = {
        'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    }[level]
    if fold_dequantize:
        opts.add_session_config_entry(FOLD_DEQUANTIZE_KEY, '1')
    if optimized_file:
        opts.optimized_model_filepath = optimized_file
    try:
        return ort.InferenceSession(model_file, opts,
                                    providers=['CPUExecutionProvider'])
    except Exception as err:  # noqa: BLE001 - reported as one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ''
        raise HawqUserError(
            f'ONNX Runtime cannot load {model_file!r} ({type(err).__name__}: '
            f'{first[:300]}): pass a model written by tools/export_onnx.py'
        ) from None


class OnnxDetector:
    """An exported detector under ONNX Runtime.

    Args:
        model_file (str): The ``.onnx`` file from
            :func:`~mmdet_hawq.deploy.onnx_export.export_onnx`.
        threads (int): Intra-op threads. Defaults to 1.
        fold_dequantize (bool): See :func:`make_session`. Defaults to False.
    """

    def __init__(self, model_file: str, threads: int = 1,
                 fold_dequantize: bool = False) -> None:
        self.session = make_session(model_file, threads,
                                    fold_dequantize=fold_dequantize)
        inputs = self.session.get_inputs()
        names = [o.name for o in self.session.get_outputs()]
        shape = inputs[0].shape if inputs else None
        if (len(inputs) != 1 or names != ['scores', 'boxes'] or not shape
                or len(shape) != 4
                or not all(isinstance(s, int) for s in shape[2:])):
            raise HawqUserError(
                f'{model_file!r} is not a detector exported by '
                'tools/export_onnx.py (one image input (1, 3, H, W), outputs '
                f'scores and boxes; it has inputs {[i.name for i in inputs]}, '
                f'outputs {names}): export it with tools/export_onnx.py')
        self.input_name = inputs[0].name
        self.input_shape: Tuple[int, int] = (shape[2], shape[3])

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Run one image.

        Args:
            image (np.ndarray): (1, 3, H, W) or (3, H, W), the pipeline's
                channel order, 0–255 (any numeric dtype).

        Returns:
            tuple[np.ndarray, np.ndarray]: Scores (L, 1, Q, C) and
            normalised (cx, cy, w, h) boxes (L, 1, Q, 4), float32.

        Raises:
            HawqUserError: The image's size is not the model's.
        """
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[2:]) != self.input_shape:
            raise HawqUserError(
                f'an image of {x.shape[2]}x{x.shape[3]} px reached a model '
                f'exported for {self.input_shape[0]}x{self.input_shape[1]}: '
                'export with --shape H W of the test pipeline\'s output, '
                'or evaluate on images of that size')
        scores, boxes = self.session.run(None, {self.input_name: x})
        return scores, boxes


def detections_from_outputs(detector: nn.Module,
                            scores: Any,
                            boxes: Any,
                            data_samples: Sequence[Any],
                            rescale: bool = True) -> List[Any]:
    """Detections by the head's own post-processing, as the detector's
    family adapter applies it to exported outputs
    (:func:`~mmdet_hawq.models.predict_from_outputs`).

    Args:
        detector (nn.Module): The mmdet detector the outputs belong to (its
            head and ``test_cfg``; no weights are used).
        scores (Tensor | np.ndarray): (L, B, Q, C) class scores.
        boxes (Tensor | np.ndarray): (L, B, Q, 4) normalised boxes.
        data_samples (Sequence[DetDataSample]): The B images' samples (their
            ``img_shape``, ``scale_factor``, ...); ``pred_instances`` is set
            on them.
        rescale (bool): Boxes in the original image's pixels. Defaults to
            True.

    Returns:
        list[DetDataSample]: ``data_samples`` with ``pred_instances``.
    """
    scores = torch.as_tensor(np.asarray(scores))
    boxes = torch.as_tensor(np.asarray(boxes))
    metas = [s.metainfo for s in data_samples]
    with torch.no_grad():
        results = predict_from_outputs(detector, scores, boxes, metas,
                                       rescale)
    for sample, result in zip(data_samples, results):
        sample.pred_instances = result
    return list(data_samples)


def dequantize_behaviour(model_file: str) -> List[Dict[str, Any]]:
    """What ONNX Runtime's graph optimisations do to ``DequantizeLinear``.

    The model is optimised at each level, with and without
    :data:`FOLD_DEQUANTIZE_KEY`, and the optimised graph (written by ONNX
    Runtime itself, ``SessionOptions.optimized_model_filepath``) is read
    back.

    Args:
        model_file (str): An exported model.

    Returns:
        list[dict]: Per setting: ``level``, ``fold_dequantize``,
        ``dequantize_nodes`` (in the optimised graph), ``initializers``
        (type name → count) and ``initializer_bytes`` (type name → bytes).
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in ('basic', 'extended', 'all'):
            for fold in (False, True):
                out = osp.join(tmp, f'{level}_{int(fold)}.onnx')
                make_session(model_file, level=level, fold_dequantize=fold,
                             optimized_file=out)
                proto = onnx.load(out)
                counts: Dict[str, int] = collections.Counter()
                sizes: Dict[str, int] = collections.Counter()
                for t in proto.graph.initializer:
                    kind = TensorProto.DataType.Name(t.data_type)
                    counts[kind] += 1
                    sizes[kind] += len(t.raw_data)
                rows.append(dict(
                    level=level, fold_dequantize=fold,
                    dequantize_nodes=sum(n.op_type == 'DequantizeLinear'
                                         for n in proto.graph.node),
                    initializers=dict(counts),
                    initializer_bytes=dict(sizes)))
    return rows

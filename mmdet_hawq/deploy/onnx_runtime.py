"""Running an exported detector on a runtime (ONNX Runtime or OpenVINO:
:mod:`~mmdet_hawq.deploy.runtimes`).

:class:`OnnxDetector` runs a model written by
:func:`~mmdet_hawq.deploy.onnx_export.export_onnx` on one image;
:func:`detections_from_outputs` passes its outputs through the detector
head's own ``predict_by_feat`` (mmdet's post-processing), so the detections
can be scored by mmdet's ``CocoMetric`` like the PyTorch model's.
"""
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import HawqUserError
from ..models.family import predict_from_outputs
from .runtimes import make_session

__all__ = ['OnnxDetector', 'detections_from_outputs']

class OnnxDetector:
    """An exported detector on a runtime.

    Args:
        model_file (str): The ``.onnx`` file from
            :func:`~mmdet_hawq.deploy.onnx_export.export_onnx` (or, on
            OpenVINO, an IR ``.xml`` of one, e.g. NNCF's).
        threads (int): Threads of one inference. Defaults to 1.
        runtime (str): ``'onnxruntime'`` or ``'openvino'``. Defaults to
            ``'onnxruntime'``.
        **options: The runtime's own settings
            (:func:`~mmdet_hawq.deploy.runtimes.make_session`).
    """

    def __init__(self, model_file: str, threads: int = 1,
                 runtime: str = 'onnxruntime', **options: Any) -> None:
        self.session = make_session(model_file, runtime, threads, **options)
        names = self.session.output_names
        shape = self.session.input_shape
        if (self.session.input_count != 1 or names != ['scores', 'boxes']
                or len(shape) != 4
                or not all(isinstance(s, int) and s > 0 for s in shape[2:])):
            raise HawqUserError(
                f'{model_file!r} is not a detector exported by '
                'tools/export_onnx.py (one image input (1, 3, H, W), outputs '
                f'scores and boxes; it has {self.session.input_count} '
                f'input(s), outputs {names}): export it with '
                'tools/export_onnx.py')
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
        scores, boxes = self.session.run(x)
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

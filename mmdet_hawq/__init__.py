"""mmdet-hawq: mixed-precision post-training weight quantization of DETR.

The library API is :func:`quantize` (:mod:`mmdet_hawq.api`); the mmdet
hook :class:`DistillSensitivityHook` calls it from a config.

Importing the package registers its modules into mmdet's registries; configs
load it with ``custom_imports = dict(imports=['mmdet_hawq'])``. Importing it
also chains a ``sys.excepthook`` (:func:`~mmdet_hawq.errors.
install_excepthook`): a :class:`HawqUserError` that reaches the top of a
program, e.g. mmdet's own ``tools/test.py``, ends it with one ``error:``
line and exit status 2 instead of a traceback; and it puts a check in
front of mmcv's compiled deformable attention and NMS
(:func:`~mmdet_hawq.models.ensure_compiled_ops`): on a GPU where mmcv was
built without CUDA ops, DINO, Deformable DETR and DDQ-DETR run through
PyTorch paths, with one log line each, instead of failing inside mmcv.
"""
from .api import (ActivationSettings, Calibration, CalibrationSettings,
                  GptqSettings, QuantResult, QuantSettings,
                  SensitivitySettings, quantize)
from .datasets import SHAPES_CLASSES, ShapesDataset, generate_shapes_dataset
from .engine import DistillSensitivityHook, load_checkpoint_file
from .errors import HawqUserError, install_excepthook
from .models import BackbonePretrainer, ensure_compiled_ops
from .version import __version__

install_excepthook()
ensure_compiled_ops()

__all__ = [
    'ActivationSettings', 'Calibration', 'CalibrationSettings',
    'GptqSettings', 'QuantResult', 'QuantSettings', 'SensitivitySettings',
    'quantize',
    'BackbonePretrainer', 'SHAPES_CLASSES', 'ShapesDataset',
    'generate_shapes_dataset', 'DistillSensitivityHook',
    'load_checkpoint_file', 'HawqUserError', '__version__'
]

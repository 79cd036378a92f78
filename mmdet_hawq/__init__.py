"""mmdet-hawq: mixed-precision post-training weight quantization of DETR.

Importing the package registers its modules into mmdet's registries; configs
load it with ``custom_imports = dict(imports=['mmdet_hawq'])``.
"""
from .datasets import SHAPES_CLASSES, ShapesDataset, generate_shapes_dataset
from .engine import DistillSensitivityHook, load_checkpoint_file
from .errors import HawqUserError
from .models import BackbonePretrainer

__version__ = '0.1.0'

__all__ = [
    'BackbonePretrainer', 'SHAPES_CLASSES', 'ShapesDataset', 'generate_shapes_dataset',
    'DistillSensitivityHook', 'load_checkpoint_file', 'HawqUserError', '__version__'
]

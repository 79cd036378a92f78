"""The mmdet hook: ``DistillSensitivityHook`` quantizes the model in
mmdet's test loop, from a config's ``custom_hooks``."""
from .quantization_hook import DistillSensitivityHook

__all__ = ['DistillSensitivityHook']

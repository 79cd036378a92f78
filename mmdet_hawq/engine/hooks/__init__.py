from .quantization_hook import DistillSensitivityHook

__all__ = ['DistillSensitivityHook']

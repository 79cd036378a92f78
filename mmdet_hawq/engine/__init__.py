from .checkpoint import load_checkpoint_file
from .hooks import DistillSensitivityHook

__all__ = ['load_checkpoint_file', 'DistillSensitivityHook']

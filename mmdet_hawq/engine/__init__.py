from .checkpoint import load_checkpoint_file
from .dist import init_cpu_process_group
from .hooks import DistillSensitivityHook

__all__ = [
    'load_checkpoint_file', 'DistillSensitivityHook',
    'init_cpu_process_group'
]

from .checkpoint import load_checkpoint_file
from .dist import init_cpu_process_group, process_shard, run_on_main
from .hooks import DistillSensitivityHook

__all__ = [
    'load_checkpoint_file', 'DistillSensitivityHook',
    'init_cpu_process_group', 'process_shard', 'run_on_main'
]

"""The package inside mmengine: the hook, a run in the Runner, the
calibration set of a config, checkpoints, the steps the command-line scripts
share (:mod:`.cli`) and the exported models' evaluation. Everything here
may read a config; the algorithms below it never do."""
from .checkpoint import load_checkpoint_file
from .process_group import init_cpu_process_group
from .hooks import DistillSensitivityHook

__all__ = [
    'load_checkpoint_file', 'DistillSensitivityHook',
    'init_cpu_process_group'
]

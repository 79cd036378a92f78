from .cache import cache_path, file_sha256, key_hash, load_cached, save_cached
from .calibration import (class_histogram, distribution_distance,
                          select_calibration_indices)
from .gauss_newton import gauss_newton_traces, softmax_fisher_draw
from .hutchinson import (batch_dots, batch_hvp, hutchinson_traces,
                         rademacher_like, sample_generator)
from .objectives import (DetrLossObjective, DistillationObjective,
                         detr_outputs, hessian_mode, preprocess_batches)
from .sharding import Shard, batch_generator
from .traces import TraceResult, should_stop

__all__ = [
    'cache_path', 'file_sha256', 'key_hash', 'load_cached', 'save_cached',
    'class_histogram', 'distribution_distance', 'select_calibration_indices',
    'gauss_newton_traces', 'softmax_fisher_draw', 'batch_hvp',
    'hutchinson_traces', 'rademacher_like', 'sample_generator',
    'DetrLossObjective', 'DistillationObjective', 'detr_outputs',
    'hessian_mode', 'preprocess_batches', 'TraceResult', 'should_stop',
    'batch_dots', 'Shard', 'batch_generator'
]

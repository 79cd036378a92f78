"""The sensitivity engine: the DETR loss and the distillation objective,
Hutchinson and Gauss-Newton trace estimators with their stopping rule,
the choice of calibration images, and the resumable sample cache. Plain
functions over modules, loss callables and batches: no config, no Runner."""
from .cache import (cache_path, file_sha256, key_hash, load_cached,
                    older_caches, save_cached, saved_samples_note)
from .image_choice import (calibration_loader, class_histogram,
                           dataset_class_ids, select_calibration_indices)
from .class_head import (fisher_draw, fold_softmax_logits,
                         folded_softmax_fisher_draw, sigmoid_fisher_draw,
                         softmax_fisher_draw, temperature_kl)
from .double_backward import double_backward_kernels
from .gauss_newton import gauss_newton_traces
from .hutchinson import (batch_dots, batch_hvp, hutchinson_traces,
                         rademacher_like, sample_generator)
from .influence import output_influence
from .objectives import (DetrLossObjective, DistillationObjective,
                         hessian_mode, preprocess_batches)
from .sharding import Shard, batch_generator
from .sampling import TraceResult, should_stop

__all__ = [
    'cache_path', 'file_sha256', 'key_hash', 'load_cached', 'older_caches',
    'save_cached',
    'saved_samples_note',
    'calibration_loader', 'class_histogram', 'dataset_class_ids',
    'select_calibration_indices',
    'gauss_newton_traces', 'softmax_fisher_draw', 'sigmoid_fisher_draw',
    'fisher_draw', 'fold_softmax_logits', 'folded_softmax_fisher_draw',
    'double_backward_kernels', 'output_influence', 'temperature_kl',
    'batch_hvp',
    'hutchinson_traces', 'rademacher_like', 'sample_generator',
    'DetrLossObjective', 'DistillationObjective',
    'hessian_mode', 'preprocess_batches', 'TraceResult', 'should_stop',
    'batch_dots', 'Shard', 'batch_generator'
]

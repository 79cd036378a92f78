"""What differs between DETR-family detectors, behind one adapter per
family (heads, outputs, queries, floors), and the kernels the estimators
need (twice-differentiable deformable attention, compiled-op checks)."""
from .adapters import ADAPTERS, DetrAdapter, adapter_of
from .adapters.deformable_detr import DEFORMABLE_ATTENTION_FLOORS
from .adapters.official_detr import (COCO_CATEGORY_IDS, convert_official_detr,
                                     is_official_detr, official_detr_state)
from .backbone_pretrainer import BackbonePretrainer
from .compiled_ops import ensure_compiled_ops
from .family import (DISTILLATION_DEFAULTS, class_activation,
                     decoder_outputs, default_min_bits, detection_head,
                     detector_family, distillation_outputs,
                     double_backward_swaps, float_weights, onnx_outputs,
                     same_queries, shares_queries,
                     predict_from_outputs, proposal_branches)

__all__ = [
    'ADAPTERS', 'BackbonePretrainer', 'COCO_CATEGORY_IDS',
    'DEFORMABLE_ATTENTION_FLOORS', 'DISTILLATION_DEFAULTS', 'DetrAdapter',
    'adapter_of', 'class_activation', 'convert_official_detr',
    'decoder_outputs', 'default_min_bits', 'detection_head',
    'detector_family', 'distillation_outputs', 'double_backward_swaps',
    'ensure_compiled_ops', 'float_weights', 'is_official_detr',
    'official_detr_state', 'onnx_outputs', 'predict_from_outputs',
    'proposal_branches', 'same_queries', 'shares_queries'
]

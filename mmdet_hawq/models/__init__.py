from .backbone_pretrainer import BackbonePretrainer
from .deformable_attention import ensure_deformable_attention
from .family import (DEFORMABLE_ATTENTION_FLOORS, DISTILLATION_DEFAULTS,
                     FAMILIES, DetrFamily, class_activation, decoder_outputs,
                     default_min_bits, detector_family,
                     distillation_outputs, final_head_weights,
                     proposal_branches)
from .official_detr import (COCO_CATEGORY_IDS, convert_official_detr,
                            is_official_detr, official_detr_state)

__all__ = [
    'BackbonePretrainer', 'COCO_CATEGORY_IDS', 'convert_official_detr',
    'is_official_detr', 'official_detr_state', 'DISTILLATION_DEFAULTS',
    'FAMILIES', 'DetrFamily', 'class_activation', 'decoder_outputs',
    'DEFORMABLE_ATTENTION_FLOORS', 'default_min_bits',
    'detector_family', 'distillation_outputs', 'final_head_weights',
    'proposal_branches', 'ensure_deformable_attention'
]

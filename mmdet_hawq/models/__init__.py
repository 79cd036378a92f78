from .backbone_pretrainer import BackbonePretrainer
from .official_detr import (COCO_CATEGORY_IDS, convert_official_detr,
                            is_official_detr, official_detr_state)

__all__ = [
    'BackbonePretrainer', 'COCO_CATEGORY_IDS', 'convert_official_detr',
    'is_official_detr', 'official_detr_state'
]

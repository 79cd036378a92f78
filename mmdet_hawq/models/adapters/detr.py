"""The one-stage families over a plain transformer decoder: DETR (softmax
head, ``num_classes + 1`` columns), Conditional DETR and DAB-DETR (sigmoid
focal heads). Everything they need is the base adapter's."""
from .base import DetrAdapter


class DETRAdapter(DetrAdapter):
    """DETR: softmax class head ``fc_cls``, box FFN ``reg_ffn``/``fc_reg``
    (the suite's tiny DETR is conftest's ``tiny_cfg``)."""

    name = 'DETR'
    detector = 'DETR'
    test_configs = {'detr': ('configs/detr/detr_tiny_shapes.py', {})}


class ConditionalDETRAdapter(DetrAdapter):
    """Conditional DETR: sigmoid head ``fc_cls``/``reg_ffn``/``fc_reg``."""

    name = 'Conditional DETR'
    detector = 'ConditionalDETR'
    test_configs = {'conditional': (
        'mmdet::conditional_detr/conditional-detr_r50_8xb2-50e_coco.py', {})}


class DABDETRAdapter(DetrAdapter):
    """DAB-DETR: sigmoid head ``fc_cls``/``fc_reg``; its first decoder
    layer's content projections see all-zero queries (no influence)."""

    name = 'DAB-DETR'
    detector = 'DABDETR'
    test_configs = {'dab': ('mmdet::dab_detr/dab-detr_r50_8xb2-50e_coco.py',
                            {})}

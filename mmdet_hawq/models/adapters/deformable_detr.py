"""The families over multi-scale deformable attention: Deformable DETR
(plain, box refinement, two-stage) and DINO.

What they add to the base adapter: bit floors for the deformable-attention
linears, the gather-based deformable attention for double backward, the
two-stage encoder proposal branches, and a loss that reads the detector's
own ``training`` flag (two-stage proposal outputs; DINO's denoising queries).
"""
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..compiled_ops import PytorchDeformableAttention
from .base import DetrAdapter
from .queries import SelectionOp, topk_from

#: The fewest bits the ILP gives the linears of multi-scale deformable
#: attention that feed non-smooth or saturating ops: the sampling offsets
#: (bilinear sampling positions) and the attention weights (a softmax over
#: the sampling points). At 2 bits their measured damage is far beyond the
#: second-order prediction: on the small Deformable DETR the 3-bit Out Sen
#: Quant plan goes from 31.9 to 54.0 mAP with these floors (docs, "Deformable
#: attention at 2 bits").
DEFORMABLE_ATTENTION_FLOORS = {'sampling_offsets': 3, 'attention_weights': 3}


@contextmanager
def pytorch_deformable_attention() -> Iterator[None]:
    """mmcv's deformable attention runs the gather-based bilinear sampling
    of :mod:`mmdet_hawq.models.bilinear` on every device, in place of
    its compiled kernel (a ``once_differentiable`` backward) and of its
    ``grid_sample`` path (no double backward on CUDA in many PyTorch
    versions): same results, double backward everywhere."""
    from ..bilinear import multi_scale_deformable_attn_bilinear
    try:
        from mmcv.ops import multi_scale_deform_attn as msda
    except ImportError:  # no mmcv ops: no deformable attention either
        yield
        return
    saved = (msda.MultiScaleDeformableAttnFunction,
             msda.multi_scale_deformable_attn_pytorch)
    msda.MultiScaleDeformableAttnFunction = PytorchDeformableAttention(
        multi_scale_deformable_attn_bilinear)
    msda.multi_scale_deformable_attn_pytorch = \
        multi_scale_deformable_attn_bilinear
    try:
        yield
    finally:
        (msda.MultiScaleDeformableAttnFunction,
         msda.multi_scale_deformable_attn_pytorch) = saved


class DeformableDETRAdapter(DetrAdapter):
    """Deformable DETR: per-layer (or shared) ``cls_branches`` and
    ``reg_branches``; a two-stage model scores every encoder token with
    branch ``L`` (L = number of decoder layers)."""

    name = 'Deformable DETR'
    detector = 'DeformableDETR'
    loss_needs_training_flag = True
    loss_note = 'the two-stage encoder proposal loss is included'
    test_configs = {
        'deformable': (
            'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
            {}),
        'deformable_refine': (
            'mmdet::deformable_detr/'
            'deformable-detr-refine_r50_16xb2-50e_coco.py', {}),
        'deformable_twostage': (
            'configs/deformable_detr/deformable_detr_tiny_shapes.py', {}),
    }
    double_backward_kernels = (pytorch_deformable_attention, )

    def default_min_bits(self, model: nn.Module) -> Dict[str, int]:
        """The :data:`DEFORMABLE_ATTENTION_FLOORS` of every multi-scale
        deformable attention (any module with ``sampling_offsets`` and
        ``attention_weights`` linears: mmcv's
        ``MultiScaleDeformableAttention`` and its subclasses).

        Returns:
            dict[str, int]: Weight name → fewest bits.
        """
        floors = {}
        for name, module in model.named_modules():
            children = dict(module.named_children())
            if all(isinstance(children.get(c), nn.Linear)
                   for c in DEFORMABLE_ATTENTION_FLOORS):
                for child, bits in DEFORMABLE_ATTENTION_FLOORS.items():
                    floors[f'{name}.{child}.weight' if name else
                           f'{child}.weight'] = bits
        return floors

    def selection_ops(self, model: nn.Module) -> Sequence[SelectionOp]:
        """``torch.topk`` of the encoder proposals' scores, in a two-stage
        model (``pre_decoder``)."""
        if not getattr(model, 'as_two_stage', False):
            return ()
        return ((torch, 'topk', topk_from), )

    def proposal_branches(self, model: nn.Module
                          ) -> Optional[Tuple[nn.Module, nn.Module]]:
        """``(cls_branches[L], reg_branches[L])`` of the head for a
        two-stage model (its top-k encoder tokens become the decoder's
        queries), else None."""
        if not getattr(model, 'as_two_stage', False):
            return None
        layers = model.decoder.num_layers
        head = self.head(model)
        return head.cls_branches[layers], head.reg_branches[layers]


class DINOAdapter(DeformableDETRAdapter):
    """DINO: two-stage Deformable DETR with denoising queries in training."""

    name = 'DINO'
    detector = 'DINO'
    loss_note = ("DINO's loss with its denoising queries, drawn with a fixed "
                 'seed per calibration batch (same queries in every sample)')
    test_configs = {'dino': ('configs/dino/dino_tiny_shapes.py',
                             dict(dn_cfg=dict(group_cfg=dict(
                                 num_dn_queries=6))))}

"""What differs between the DETR-family detectors, in one table.

Every supported mmdet detector produces, in eval tensor mode, the class
scores and boxes of every decoder layer through the same call
(``extract_feat`` → ``forward_transformer`` → ``bbox_head``). What differs is
kept here and nowhere else:

* the class head: softmax over ``num_classes + 1`` (DETR) or per-class
  sigmoid/focal with ``cls_out_channels = num_classes`` (the others), read
  from the head's ``loss_cls.use_sigmoid``;
* whether the detector computes its training loss only when its own
  ``training`` flag is set (two-stage Deformable DETR and DINO build the
  encoder proposal outputs, and DINO its denoising queries, only then);
* the head's final class and box FFNs, which stay in float: every weight the
  ``bbox_head`` owns (``fc_cls``/``reg_ffn``/``fc_reg`` of DETR and
  Conditional DETR, DAB-DETR's ``fc_cls``/``fc_reg``, the per-layer or
  shared ``cls_branches``/``reg_branches`` of Deformable DETR and DINO,
  including the encoder proposal branch of two-stage models). They are found
  by parameter identity, so a branch that a decoder also holds under another
  name is still recognised.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..errors import HawqUserError

Batch = Dict  # {'inputs': Tensor (B, 3, H, W), 'data_samples': [...]}


@dataclass(frozen=True)
class DetrFamily:
    """Facts about one supported detector type.

    Attributes:
        name (str): Human-readable name, e.g. ``'DINO'``.
        detector (str): mmdet class name (subclasses match too).
        loss_needs_training_flag (bool): The detector's ``loss`` reads its
            own ``training`` flag (two-stage proposals, denoising queries).
        loss_note (str): How Loss Sen treats the family, for reports.
    """

    name: str
    detector: str
    loss_needs_training_flag: bool = False
    loss_note: str = ''


#: The supported families, most specific first (DINO subclasses
#: DeformableDETR, so it must be found before it).
FAMILIES: Tuple[DetrFamily, ...] = (
    DetrFamily('DINO', 'DINO', True,
               "DINO's loss with its denoising queries, drawn with a fixed "
               'seed per calibration batch (same queries in every sample)'),
    DetrFamily('Deformable DETR', 'DeformableDETR', True,
               'the two-stage encoder proposal loss is included'),
    DetrFamily('Conditional DETR', 'ConditionalDETR'),
    DetrFamily('DAB-DETR', 'DABDETR'),
    DetrFamily('DETR', 'DETR'),
)


#: Default (λ_KL, T) of the distillation loss by class activation: the
#: paper's values for softmax. For sigmoid heads T in {1, 2, 6} was measured
#: on the small DINO (README: 'Temperature and λ_KL for sigmoid heads'):
#: the same 4-bit mAP, 3-bit 30.7-32.6; λ_KL only scales Gauss-Newton
#: traces, so it cannot change their plans.
DISTILLATION_DEFAULTS = {'softmax': (0.05, 6.0), 'sigmoid': (0.05, 6.0)}


#: The fewest bits the ILP gives the linears of multi-scale deformable
#: attention that feed non-smooth or saturating ops: the sampling offsets
#: (bilinear sampling positions) and the attention weights (a softmax over
#: the sampling points). At 2 bits their measured damage is far beyond the
#: second-order prediction: on the small Deformable DETR the 3-bit Out Sen
#: Quant plan goes from 31.9 to 54.0 mAP with these floors (README,
#: "Deformable attention at 2 bits").
DEFORMABLE_ATTENTION_FLOORS = {'sampling_offsets': 3, 'attention_weights': 3}


def default_min_bits(model: nn.Module) -> Dict[str, int]:
    """Per-weight floors found from the model's structure: the
    :data:`DEFORMABLE_ATTENTION_FLOORS` of every multi-scale deformable
    attention (any module with ``sampling_offsets`` and
    ``attention_weights`` linears: mmcv's ``MultiScaleDeformableAttention``
    and its subclasses).

    Args:
        model (nn.Module): The detector.

    Returns:
        dict[str, int]: Weight name → fewest bits (empty for DETR,
        Conditional and DAB-DETR).
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


def detector_family(model: Union[nn.Module, type]) -> DetrFamily:
    """The family of ``model`` (by its class or a base class).

    Args:
        model (nn.Module | type): A detector, or its class (to check a
            config's ``model.type`` before anything is built).

    Raises:
        HawqUserError: The detector is not a supported DETR-family type.
    """
    cls = model if isinstance(model, type) else type(model)
    mro = [c.__name__ for c in cls.__mro__]
    for family in FAMILIES:
        if family.detector in mro:
            return family
    raise HawqUserError(
        f'detector type {cls.__name__} is not supported: the '
        'supported DETR-family detectors are '
        f'{", ".join(f.detector for f in FAMILIES)} (and their subclasses)')


def class_activation(model: nn.Module) -> str:
    """``'sigmoid'`` for a per-class sigmoid/focal head, else ``'softmax'``.
    """
    head = getattr(model, 'bbox_head', None)
    loss_cls = getattr(head, 'loss_cls', None)
    return 'sigmoid' if getattr(loss_cls, 'use_sigmoid', False) else \
        'softmax'


def final_head_weights(model: nn.Module) -> Dict[int, str]:
    """``id(parameter)`` → owner name of every weight ``bbox_head`` owns.

    These are the final class/box FFNs (and the encoder proposal branch of
    two-stage models), which stay in float by default.
    """
    head = getattr(model, 'bbox_head', None)
    if head is None:
        return {}
    return {id(p): f'bbox_head.{n}' for n, p in head.named_parameters()}


def decoder_outputs(model: nn.Module,
                    batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class scores and boxes of every decoder layer, in eval tensor mode.

    Args:
        model (nn.Module): A supported mmdet DETR-family detector.
        batch (dict): Preprocessed ``inputs`` and ``data_samples``.

    Returns:
        tuple: scores (L, B, Q, C) — C = num_classes + 1 for a softmax head,
        num_classes for a sigmoid one — and normalised (cx, cy, w, h) boxes
        (L, B, Q, 4), L = number of decoder layers.

    Raises:
        HawqUserError: The head does not return per-layer scores and boxes
            (e.g. a decoder built without ``return_intermediate``).
    """
    feats = model.extract_feat(batch['inputs'])
    head_inputs = model.forward_transformer(feats, batch['data_samples'])
    out = model.bbox_head(**head_inputs)
    ok = (isinstance(out, (tuple, list)) and len(out) >= 2
          and all(torch.is_tensor(t) and t.dim() == 4 for t in out[:2])
          and out[1].shape[-1] == 4)
    if not ok:
        shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                  for t in (out if isinstance(out, (tuple, list)) else [out])]
        raise HawqUserError(
            f'{type(model).__name__}: its head returned {shapes} in tensor '
            'mode, not the class scores and boxes of every decoder layer '
            '(L, B, Q, C) and (L, B, Q, 4): build the decoder with '
            'return_intermediate=True')
    return out[0], out[1]


def proposal_branches(model: nn.Module
                      ) -> Optional[Tuple[nn.Module, nn.Module]]:
    """The encoder proposal class and box branches of a two-stage model.

    Two-stage Deformable DETR and DINO score every encoder token with
    ``bbox_head.cls_branches[L]`` and ``reg_branches[L]`` (L = number of
    decoder layers) and let the top-k tokens become the decoder's queries.

    Returns:
        tuple or None: ``(cls_branch, reg_branch)``, or None for a model
        without encoder proposals.
    """
    if not getattr(model, 'as_two_stage', False):
        return None
    layers = model.decoder.num_layers
    head = model.bbox_head
    return head.cls_branches[layers], head.reg_branches[layers]


def distillation_outputs(model: nn.Module, batch: Batch
                         ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Every output the distillation loss compares, in groups.

    The first group is :func:`decoder_outputs`. A two-stage model adds its
    encoder proposals over all tokens, caught from the proposal branches
    during the same forward: class logits (1, B, N, C) and the proposal
    branch's box offsets before the sigmoid (1, B, N, 4). The top-k
    selection of those proposals has no gradient, so without this group the
    weights that decide which tokens become queries look insensitive.

    Args:
        model (nn.Module): A supported mmdet DETR-family detector.
        batch (dict): Preprocessed ``inputs`` and ``data_samples``.

    Returns:
        list[tuple]: ``(scores, boxes)`` per group.
    """
    branches = proposal_branches(model)
    if branches is None:
        return [decoder_outputs(model, batch)]
    caught: Dict[str, torch.Tensor] = {}

    def catch(key: str):
        def hook(module, args, output):
            caught[key] = output
        return hook

    handles = [m.register_forward_hook(catch(k))
               for k, m in zip(('cls', 'box'), branches)]
    try:
        groups = [decoder_outputs(model, batch)]
    finally:
        for h in handles:
            h.remove()
    groups.append((caught['cls'][None], caught['box'][None]))
    return groups

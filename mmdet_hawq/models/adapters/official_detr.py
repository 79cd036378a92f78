"""The official facebookresearch/detr checkpoint in mmdet's ``DETR`` names.

The paper quantizes the official DETR-R50 (``detr-r50-e632da11.pth``, 42.0
mAP). Its state dict (under the key ``model``) names the layers of the
original code; mmdet 3.x's ``DETR`` (``detr_r50_8xb2-150e_coco.py``) names
them differently and ships no converter. The layers compute the same
functions (post-norm encoder and decoder, a final decoder norm, the same sine
position encoding and padding masks), so the conversion renames every tensor
and changes two things:

* the class head: the official ``class_embed`` has one row per COCO category
  id (0 to 90) plus the no-object row (91), 92 in all; mmdet's ``fc_cls`` has
  the 80 categories in increasing id order (mmdet's contiguous labels) and
  then background, 81. The rows of the 80 ids and the last row are kept.
* the frozen batch norms of the backbone have no ``num_batches_tracked``;
  mmdet's ``BN`` has one, set to 0 (it is unused at inference).

Example:
    >>> state = torch.load('detr-r50-e632da11.pth')['model']
    >>> is_official_detr(state)
    True
    >>> model.load_state_dict(convert_official_detr(state), strict=True)
"""
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from ...errors import HawqUserError, short_list

#: The 80 COCO category ids in increasing order: mmdet's label ``i`` is
#: category ``COCO_CATEGORY_IDS[i]``; the official head's row index is the id.
COCO_CATEGORY_IDS: Tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)

_LAYER = r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.'

#: (official pattern, mmdet replacement), tried in order; the first match
#: renames the key. Layer norms shift their index (``_norm``).
_RENAMES: Tuple[Tuple[str, Any], ...] = (
    (r'^backbone\.0\.body\.', 'backbone.'),
    (r'^input_proj\.', 'neck.convs.0.conv.'),
    (_LAYER + r'self_attn\.', r'\1.layers.\2.self_attn.attn.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.',
     r'decoder.layers.\1.cross_attn.attn.'),
    (_LAYER + r'linear1\.', r'\1.layers.\2.ffn.layers.0.0.'),
    (_LAYER + r'linear2\.', r'\1.layers.\2.ffn.layers.1.'),
    (r'^transformer\.decoder\.norm\.', 'decoder.post_norm.'),
    (r'^query_embed\.', 'query_embedding.'),
    (r'^class_embed\.', 'bbox_head.fc_cls.'),
    (r'^bbox_embed\.layers\.0\.', 'bbox_head.reg_ffn.layers.0.0.'),
    (r'^bbox_embed\.layers\.1\.', 'bbox_head.reg_ffn.layers.1.'),
    (r'^bbox_embed\.layers\.2\.', 'bbox_head.fc_reg.'),
)


def _norm(match: re.Match) -> str:
    """``normK`` (1-based) of a layer -> ``norms.{K-1}``."""
    return (f'{match.group(1)}.layers.{match.group(2)}.norms.'
            f'{int(match.group(3)) - 1}.')


_RULES = (*_RENAMES, (_LAYER + r'norm(\d)\.', _norm))


def is_official_detr(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict has the names of the facebookresearch/detr model.

    Args:
        state_dict (Mapping[str, Any]): A state dict (the ``model`` entry of
            an official checkpoint), not the whole checkpoint.

    Returns:
        bool: True when it has the official backbone, transformer and query
        names.
    """
    keys = [k for k in state_dict if isinstance(k, str)]
    return ('query_embed.weight' in state_dict
            and any(k.startswith('backbone.0.body.') for k in keys)
            and any(k.startswith('transformer.decoder.layers.')
                    for k in keys))


def official_detr_state(checkpoint: Any) -> Optional[Mapping[str, Any]]:
    """The official state dict inside a loaded checkpoint, if it is one.

    Args:
        checkpoint (Any): What ``torch.load`` returned.

    Returns:
        Mapping[str, Any] | None: ``checkpoint['model']`` (the layout of the
        official files) or the checkpoint itself when it has the official
        names; None otherwise.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    inner = checkpoint.get('model')
    if isinstance(inner, Mapping) and is_official_detr(inner):
        return inner
    return checkpoint if is_official_detr(checkpoint) else None


def _rename(key: str) -> Optional[str]:
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return None


def _class_rows(tensor: torch.Tensor, class_ids: Sequence[int]
                ) -> torch.Tensor:
    """Rows ``class_ids`` then the last (no-object) row of the class head.

    Args:
        tensor (torch.Tensor): ``class_embed`` weight (C+1, D) or bias (C+1,),
            row ``i`` for category id ``i``, the last row for no-object.
        class_ids (Sequence[int]): Category ids in mmdet's label order.

    Returns:
        torch.Tensor: (len(class_ids)+1, D) or (len(class_ids)+1,).
    """
    rows = tensor.shape[0]
    if max(class_ids) >= rows - 1 or min(class_ids) < 0:
        raise HawqUserError(
            f'the official class head has {rows} rows (category ids 0 to '
            f'{rows - 2} and no-object) but class_ids reach '
            f'{max(class_ids)}: pass the category ids of the checkpoint\'s '
            'dataset (COCO by default)')
    index = torch.tensor([*class_ids, rows - 1], dtype=torch.long,
                         device=tensor.device)
    return tensor.index_select(0, index).clone()


def convert_official_detr(state_dict: Mapping[str, torch.Tensor],
                          class_ids: Sequence[int] = COCO_CATEGORY_IDS
                          ) -> 'OrderedDict[str, torch.Tensor]':
    """Rename a facebookresearch/detr state dict to mmdet's ``DETR``.

    The input is not modified; unchanged tensors are shared, not copied.

    Args:
        state_dict (Mapping[str, torch.Tensor]): The official state dict
            (the ``model`` entry of the checkpoint).
        class_ids (Sequence[int]): Category ids of mmdet's labels 0..C-1, in
            order. Defaults to COCO_CATEGORY_IDS (mmdet's COCO labels).

    Returns:
        OrderedDict[str, torch.Tensor]: The state dict in mmdet's names, with
        ``num_batches_tracked`` (0) for every backbone batch norm.

    Raises:
        HawqUserError: A key has no mmdet counterpart (e.g. the encoder norm
            of a pre-norm model, or a segmentation head).
    """
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        new = _rename(key)
        if new is None:
            unknown.append(key)
            continue
        if new.startswith('bbox_head.fc_cls.'):
            value = _class_rows(value, class_ids)
        out[new] = value
        if new.startswith('backbone.') and new.endswith('.running_var'):
            out[new[:-len('running_var')] + 'num_batches_tracked'] = \
                torch.tensor(0, dtype=torch.long, device=value.device)
    if unknown:
        raise HawqUserError(
            f'{len(unknown)} key(s) of the official DETR checkpoint have no '
            f'counterpart in mmdet\'s DETR ({short_list(unknown)}): only the '
            'detection model with a post-norm transformer (e.g. '
            'detr-r50-e632da11.pth) converts; panoptic and pre-norm models '
            'do not')
    return out


def class_head_note(official: Mapping[str, Any],
                    converted: Mapping[str, Any]) -> str:
    """For the log: how the class head's rows changed in the conversion.

    Args:
        official (Mapping[str, Any]): The official state dict.
        converted (Mapping[str, Any]): :func:`convert_official_detr`'s
            result.

    Returns:
        str: ``'; class head 92 -> 81 rows: ...'``, or '' without a class
        head.
    """
    if 'bbox_head.fc_cls.bias' not in converted:
        return ''
    return (f'; class head {len(official["class_embed.bias"])} -> '
            f'{len(converted["bbox_head.fc_cls.bias"])} rows: the COCO '
            'category ids, then no-object')

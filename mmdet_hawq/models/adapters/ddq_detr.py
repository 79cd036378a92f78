"""DDQ-DETR (Dense Distinct Queries, mmdet's ``DDQDETR``): DINO with a dense
auxiliary branch and NMS inside its query selection.

What it adds to DINO's adapter:

* **Distinct queries.** The encoder's top-k proposals are chosen after a
  class-agnostic NMS (``dqs_cfg``), and every decoder layer but the last
  runs another NMS over the queries and masks the suppressed ones out of the
  next layer's self-attention. In eval tensor mode the head still returns
  all ``num_queries`` queries per layer (L, B, Q, C); mmdet's
  ``predict_by_feat`` keeps the distinct ones of the last layer, read from
  the detector's shared ``cache_dict``. The distillation loss compares all
  of them by index, like DINO's.
* **Dense auxiliary branch.** In training, ``1.5 × num_queries`` dense
  queries go through the head's ``aux_cls_branches``/``aux_reg_branches``
  and the encoder's extra branch (``cls_branches[L + 1]``/
  ``reg_branches[L + 1]``). The head owns them, so they stay float; at
  inference they are never called.
* **Loss.** The dense queries and their branches exist only when the
  detector, its decoder and its head are each in training mode (each reads
  its own flag), so the Loss Sen loss sets those three flags.
* **ONNX.** The NMS is mmcv's compiled op, which has no ONNX form; during
  :meth:`DDQDETRAdapter.onnx_outputs` it runs as an op that exports as ONNX
  ``NonMaxSuppression`` (same offsets, same IoU test, PyTorch results
  unchanged), and the scores of the queries that are not distinct are
  ``-inf`` so that :meth:`DDQDETRAdapter.predict` keeps the distinct ones
  from the outputs alone.
"""
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import HawqUserError
from .base import Batch, Group
from .deformable_detr import DINOAdapter
from .queries import SelectionOp, batched_nms_from

#: mmdet's modules of DDQ's query selection: the detector's (encoder
#: proposals) and the decoder's (distinct queries).
NMS_MODULES = ('mmdet.models.detectors.ddq_detr',
               'mmdet.models.layers.transformer.ddq_detr_layers')


class ExportableNMS(torch.autograd.Function):
    """The keep indices of DDQ's single-class ``batched_nms``, exported as
    ONNX ``NonMaxSuppression``.

    mmcv shifts every box by ``max(boxes) + 1`` (the offset of class 1)
    and runs NMS, which keeps boxes in decreasing score order, dropping any
    box whose IoU with a kept one exceeds the threshold. The forward pass
    calls mmcv itself; the ONNX graph adds the same offset and runs
    ``NonMaxSuppression`` (same IoU test, same order; boxes of exactly equal
    scores may be taken in another order).
    """

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
        """boxes (N, 4) x1y1x2y2, scores (N, ) → kept indices (K, ) int64.
        """
        from mmcv.ops import batched_nms
        return batched_nms(boxes, scores, torch.ones_like(scores),
                           dict(type='nms', iou_threshold=iou_threshold))[1]

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any,
                 iou_threshold: float) -> Any:
        """``Gather(NonMaxSuppression(boxes + max + 1, scores), column 2)``.
        """
        def const(value: Any, dtype: torch.dtype) -> Any:
            return g.op('Constant', value_t=torch.tensor(value, dtype=dtype))

        offset = g.op('Add', g.op('ReduceMax', boxes, keepdims_i=0),
                      const(1.0, torch.float32))
        shifted = g.op('Unsqueeze', g.op('Add', boxes, offset),
                       const([0], torch.int64))
        scores = g.op('Unsqueeze', scores, const([0, 1], torch.int64))
        selected = g.op('NonMaxSuppression', shifted, scores,
                        const([2**31 - 1], torch.int64),
                        const([iou_threshold], torch.float32))
        return g.op('Gather', selected, const(2, torch.int64), axis_i=1)


def exportable_batched_nms(boxes: torch.Tensor, scores: torch.Tensor,
                           idxs: torch.Tensor, nms_cfg: Optional[dict],
                           class_agnostic: bool = False
                           ) -> Tuple[None, torch.Tensor]:
    """mmcv's ``batched_nms`` as DDQ calls it at inference (one class,
    ``dict(type='nms', iou_threshold=...)``): ``(None, keep)``; only the
    kept indices (K, ) are used by DDQ.

    Raises:
        HawqUserError: ``dqs_cfg`` is not a plain NMS.
    """
    if set(nms_cfg or {}) != {'type', 'iou_threshold'} or \
            nms_cfg['type'] != 'nms':
        raise HawqUserError(
            f'DDQ-DETR dqs_cfg={nms_cfg!r} cannot be exported to ONNX: only '
            "dict(type='nms', iou_threshold=...) has an ONNX form "
            '(NonMaxSuppression)')
    return None, ExportableNMS.apply(boxes, scores,
                                     float(nms_cfg['iou_threshold']))


def exportable_align_tensor(inputs: List[torch.Tensor],
                            max_len: int) -> torch.Tensor:
    """mmdet's ``align_tensor`` (pad each (n_i, ...) to (max_len, ...) with
    zeros and stack, n_i ≤ max_len) without reading ``n_i`` in Python, so
    that a traced graph pads as many rows as each image needs."""
    return torch.stack([torch.cat([t, t.new_zeros(max_len, *t.shape[1:])])
                        [:max_len] for t in inputs])


@contextmanager
def exportable_query_selection() -> Iterator[None]:
    """DDQ's query selection as a traced graph can compute it: NMS by
    :func:`exportable_batched_nms`, padding by
    :func:`exportable_align_tensor`, and the decoder's copy of its
    self-attention mask by ``clone`` (a traced ``copy.deepcopy`` of a
    tensor loses its shape). Same values in PyTorch."""
    import importlib
    detector, decoder = [importlib.import_module(m) for m in NMS_MODULES]
    saved = (detector.batched_nms, decoder.batched_nms,
             detector.align_tensor, decoder.copy)
    detector.batched_nms = decoder.batched_nms = exportable_batched_nms
    detector.align_tensor = exportable_align_tensor
    decoder.copy = SimpleNamespace(deepcopy=torch.Tensor.clone)
    try:
        yield
    finally:
        (detector.batched_nms, decoder.batched_nms, detector.align_tensor,
         decoder.copy) = saved


class DDQDETRAdapter(DINOAdapter):
    """DDQ-DETR: DINO's adapter plus distinct queries and the dense
    auxiliary branch (see the module docstring)."""

    name = 'DDQ-DETR'
    detector = 'DDQDETR'
    loss_note = ("DDQ's loss with its denoising queries (fixed seed per "
                 'calibration batch) and its dense queries through the '
                 'auxiliary branches (detector, decoder and head in training '
                 'mode)')
    test_configs = {'ddq': ('mmdet::ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py',
                            dict(dn_cfg=dict(group_cfg=dict(
                                num_dn_queries=6))))}

    def float_weights(self, model: nn.Module) -> Dict[int, str]:
        """The head's weights, the dense auxiliary branches (used in
        training only) named as such."""
        head = self.head(model)
        reasons = super().float_weights(model)
        aux = [head.aux_cls_branches, head.aux_reg_branches,
               head.cls_branches[-1], head.reg_branches[-1]]
        note = ('dense auxiliary branch of the head '
                f'({type(head).__name__}), training only')
        reasons.update({id(p): note for m in aux for p in m.parameters()})
        return reasons

    def selection_ops(self, model: nn.Module) -> Sequence[SelectionOp]:
        """DINO's top-k, and the NMS of the encoder's distinct queries and
        between decoder layers (mmcv's ``batched_nms`` in both modules of
        :data:`NMS_MODULES`)."""
        import importlib
        return tuple(super().selection_ops(model)) + tuple(
            (importlib.import_module(m), 'batched_nms', batched_nms_from)
            for m in NMS_MODULES)

    def loss_modules(self, model: nn.Module) -> List[nn.Module]:
        """The head and its dense queries' loss (``DDQAuxLoss``)."""
        head = self.head(model)
        return [head, head.aux_loss_for_dense]

    def training_flag_modules(self, model: nn.Module) -> List[nn.Module]:
        """The detector (dense and denoising queries), its decoder and its
        head (the dense queries' auxiliary branches)."""
        return [model, model.decoder, self.head(model)]

    def distinct_queries(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Which queries of decoder layer ``layer`` (≥ 1) of the last
        forward pass are distinct: (B, Q) bool, as mmdet's
        ``predict_by_feat`` reads them from ``cache_dict``."""
        cache = model.cache_dict
        masks = cache['distinct_query_mask'][layer - 1]
        heads = cache['num_heads']
        return masks[::heads, 0]

    def onnx_outputs(self, model: nn.Module, batch: Batch) -> Group:
        """:meth:`decoder_outputs` through the exportable NMS, the scores of
        every layer's non-distinct queries ``-inf`` (layer 0: all
        distinct)."""
        with exportable_query_selection():
            scores, boxes = self.decoder_outputs(model, batch)
        layers = [scores[0]] + [
            scores[i].masked_fill(
                ~self.distinct_queries(model, i)[..., None], -float('inf'))
            for i in range(1, scores.shape[0])]
        return torch.stack(layers), boxes

    def predict(self, model: nn.Module, scores: torch.Tensor,
                boxes: torch.Tensor, metas: Sequence[dict],
                rescale: bool = True) -> List[Any]:
        """mmdet's ``DDQDETRHead.predict_by_feat`` with the distinct
        queries read from the last layer's scores (not ``-inf``) instead of
        ``cache_dict``."""
        head = self.head(model)
        keep = scores[-1, ..., 0] > -float('inf')
        return [head._predict_by_feat_single(s[k], b[k], meta, rescale)
                for s, b, k, meta in zip(scores[-1], boxes[-1], keep, metas)]

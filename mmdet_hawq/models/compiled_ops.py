"""mmcv's compiled ops on a device where they do not run.

mmcv calls its compiled kernels whenever the inputs are on CUDA (its NMS on
every device), which fails where mmcv was built without CUDA ops (common
with new torch builds) or without ops at all. Two of them sit on the
DETR family's inference path: the multi-scale deformable attention (DINO,
Deformable DETR, DDQ-DETR) and NMS (DDQ-DETR's distinct query selection).
:func:`ensure_compiled_ops`, run when the package is imported, puts a check
in front of each: it is tried once per device on tiny tensors, and a device
where it fails runs a PyTorch implementation (same results) with one log
line. Evaluation, calibration and every tool are covered, with or without
the hook; where the kernels run nothing changes.
"""
import importlib
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log

#: ``(value, spatial_shapes, sampling_locations, attention_weights) →
#: output``, the signature of mmcv's ``multi_scale_deformable_attn_pytorch``.
DeformableFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor], torch.Tensor]


class PytorchDeformableAttention:
    """Drop-in for ``MultiScaleDeformableAttnFunction`` (same ``apply``
    signature) that runs a PyTorch implementation of the attention."""

    def __init__(self, pytorch_fn: DeformableFn) -> None:
        self._fn = pytorch_fn

    def apply(self, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor,
              im2col_step: int) -> torch.Tensor:
        """value (B, N, heads, d), sampling_locations (B, Q, heads, levels,
        points, 2), attention_weights (B, Q, heads, levels, points) →
        (B, Q, heads · d)."""
        return self._fn(value, spatial_shapes, sampling_locations,
                        attention_weights)


def torch_nms(boxes: torch.Tensor, scores: torch.Tensor,
              iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Greedy NMS as mmcv's kernel computes it: boxes in decreasing score
    order, each dropped when its IoU with a kept one exceeds
    ``iou_threshold`` (widths ``x2 − x1 + offset``).

    Args:
        boxes (Tensor): (N, 4) x1y1x2y2.
        scores (Tensor): (N, ).
        iou_threshold (float): IoU above which a box is dropped.
        offset (int): 0 or 1, added to widths and heights.

    Returns:
        Tensor: (K, ) int64 kept indices in decreasing score order, on the
        boxes' device.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter)
    # the greedy pass over one host copy of the (N, N) comparisons
    over = (iou > iou_threshold).cpu().numpy()
    keep, dropped = [], np.zeros(len(over), dtype=bool)
    for i in range(len(over)):
        if not dropped[i]:
            keep.append(i)
            dropped |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long,
                                 device=order.device)]


class _CheckedOp:
    """One of mmcv's compiled ops behind a check: tried once per device
    (:meth:`probe`); on a device where it fails the subclass runs its
    PyTorch path instead, said once in the log (:meth:`runs_on`).

    Args:
        compiled (Any): mmcv's op.
    """

    #: The log line's names: (the op, the detectors that need it).
    what: Tuple[str, str] = ('', '')

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        #: device → whether the compiled op runs there
        self.runs: Dict[str, bool] = {}

    def probe(self, device: torch.device) -> None:
        """Run the compiled op on tiny tensors on ``device`` (raises where
        it fails)."""
        raise NotImplementedError

    def check(self, device: torch.device) -> Optional[str]:
        """Try the op on ``device`` once; the log line if it fails (None if
        it runs or was tried before)."""
        if str(device) in self.runs:
            return None
        try:
            self.probe(device)
        except Exception as error:  # noqa: BLE001 (any failure of the op)
            self.runs[str(device)] = False
            reason = str(error).strip().splitlines() or [type(error).__name__]
            return (f"mmcv's compiled {self.what[0]} is not available on "
                    f'{device} ({reason[0]}): {self.what[1]} run through '
                    'a PyTorch path (slower, same results)')
        self.runs[str(device)] = True
        return None

    def runs_on(self, device: torch.device) -> bool:
        """Whether the compiled op runs on ``device`` (checked, and logged,
        on its first call there)."""
        note = self.check(device)
        if note is not None:
            print_log(note, logger='current', level=logging.WARNING)
        return self.runs[str(device)]


def _probe_inputs(device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Tiny inputs of the deformable-attention kernel on ``device``: value
    (1, 5, 1, 2) over maps 2×2 and 1×1, locations (1, 1, 1, 2, 1, 2) and
    weights (1, 1, 1, 2, 1), the float ones requiring gradients."""
    value = torch.rand(1, 5, 1, 2, device=device, requires_grad=True)
    shapes = torch.tensor([[2, 2], [1, 1]], device=device)
    start = torch.tensor([0, 4], device=device)
    loc = torch.rand(1, 1, 1, 2, 1, 2, device=device, requires_grad=True)
    weights = torch.rand(1, 1, 1, 2, 1, device=device, requires_grad=True)
    return value, shapes, start, loc, weights


class _CheckedDeformableAttention(_CheckedOp):
    """mmcv's compiled deformable attention behind the check (same
    ``apply`` signature); the fallback is mmcv's ``grid_sample`` path.

    Args:
        compiled (Any): mmcv's ``MultiScaleDeformableAttnFunction``.
        pytorch_fn (Callable): mmcv's ``multi_scale_deformable_attn_pytorch``.
    """

    what = ('deformable attention', 'DINO/Deformable DETR/DDQ-DETR')

    def __init__(self, compiled: Any, pytorch_fn: DeformableFn) -> None:
        super().__init__(compiled)
        self._fn = pytorch_fn

    def probe(self, device: torch.device) -> None:
        with torch.enable_grad():
            value, shapes, start, loc, weights = _probe_inputs(device)
            out = self.compiled.apply(value, shapes, start, loc, weights, 64)
            torch.autograd.grad(out.sum(), (value, loc, weights))

    def apply(self, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor,
              im2col_step: int) -> torch.Tensor:
        """As ``MultiScaleDeformableAttnFunction.apply`` (shapes: see
        :class:`PytorchDeformableAttention`)."""
        if self.runs_on(value.device):
            return self.compiled.apply(value, spatial_shapes,
                                       level_start_index, sampling_locations,
                                       attention_weights, im2col_step)
        return self._fn(value, spatial_shapes, sampling_locations,
                        attention_weights)


class _CheckedNMS(_CheckedOp):
    """mmcv's compiled ops module as ``mmcv.ops.nms`` sees it, its ``nms``
    behind the check (the fallback :func:`torch_nms`); every other op is
    the module's own."""

    what = ('NMS', "DDQ-DETR's query selections")

    def probe(self, device: torch.device) -> None:
        boxes = torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 1.9]],
                             device=device)
        scores = torch.tensor([0.9, 0.8], device=device)
        self.compiled.nms(boxes, scores, iou_threshold=0.5, offset=0)

    def nms(self, boxes: torch.Tensor, scores: torch.Tensor,
            iou_threshold: float, offset: int) -> torch.Tensor:
        """As mmcv's ``ext_module.nms``: (N, 4), (N, ) → kept (K, )."""
        if self.runs_on(boxes.device):
            return self.compiled.nms(boxes, scores,
                                     iou_threshold=iou_threshold,
                                     offset=offset)
        return torch_nms(boxes, scores, iou_threshold, offset)

    def __getattr__(self, name: str) -> Any:
        if name == 'compiled':  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.compiled, name)


def ensure_compiled_ops(device: Union[None, str, torch.device] = None
                        ) -> Optional[str]:
    """Put the checks of :class:`_CheckedDeformableAttention` and
    :class:`_CheckedNMS` in front of mmcv's compiled ops (once per
    process), and on a CUDA ``device`` run them now.

    The package runs this at import without a device, so the first CUDA
    call of any run (the test loop's, the sensitivity step's, a tool's) is
    checked; a tool that wants the lines in its own output passes its
    device.

    Args:
        device (str or torch.device, optional): A device to check now (only
            CUDA devices are checked). Defaults to None.

    Returns:
        str or None: The log lines of the ops that fail on ``device``
        (returned once); None otherwise (not CUDA, no mmcv ops, the ops
        run, or already checked).
    """
    try:
        from mmcv.ops import multi_scale_deform_attn as msda
        # the module (mmcv.ops' attribute ``nms`` is the function)
        mmcv_nms = importlib.import_module('mmcv.ops.nms')
    except (ImportError, OSError):  # no mmcv ops: nothing to check
        return None
    checked: List[_CheckedOp] = []
    if not isinstance(mmcv_nms.ext_module, _CheckedNMS):
        mmcv_nms.ext_module = _CheckedNMS(mmcv_nms.ext_module)
    checked.append(mmcv_nms.ext_module)
    kernel = msda.MultiScaleDeformableAttnFunction
    if not isinstance(kernel, PytorchDeformableAttention):
        # (a PytorchDeformableAttention is the Hessian mode's routing)
        if not isinstance(kernel, _CheckedDeformableAttention):
            kernel = _CheckedDeformableAttention(
                kernel, msda.multi_scale_deformable_attn_pytorch)
            msda.MultiScaleDeformableAttnFunction = kernel
        checked.append(kernel)
    if device is None or torch.device(device).type != 'cuda':
        return None
    device = torch.device(device)
    if device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    notes = [n for n in (op.check(device) for op in checked) if n]
    return '\n'.join(notes) or None

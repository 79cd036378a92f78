"""mmcv's multi-scale deformable attention on a GPU where its compiled
kernel does not run.

mmcv calls its compiled kernel (``MultiScaleDeformableAttnFunction``)
whenever the value is on CUDA, which fails where mmcv was built without CUDA
ops (common with new torch builds). :func:`ensure_deformable_attention`, run
when the package is imported, puts a check in front of that kernel: it is
tried once per device on tiny tensors (forward and backward), and a device
where it fails runs mmcv's PyTorch path (``grid_sample``: slower, same
results) with one log line. Evaluation, calibration and every tool are
covered, with or without the hook; where the kernel runs nothing changes.
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

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


def _probe_inputs(device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Tiny inputs of the compiled kernel on ``device``: value (1, 5, 1, 2)
    over maps 2×2 and 1×1, locations (1, 1, 1, 2, 1, 2) and weights
    (1, 1, 1, 2, 1), the float ones requiring gradients."""
    value = torch.rand(1, 5, 1, 2, device=device, requires_grad=True)
    shapes = torch.tensor([[2, 2], [1, 1]], device=device)
    start = torch.tensor([0, 4], device=device)
    loc = torch.rand(1, 1, 1, 2, 1, 2, device=device, requires_grad=True)
    weights = torch.rand(1, 1, 1, 2, 1, device=device, requires_grad=True)
    return value, shapes, start, loc, weights


class _CheckedDeformableAttention:
    """mmcv's compiled kernel behind a check (same ``apply`` signature):
    tried once per device on tiny tensors (forward and backward); a device
    where it fails runs mmcv's PyTorch path instead (``grid_sample``:
    slower, same results), said once in the log.

    Args:
        compiled (Any): mmcv's ``MultiScaleDeformableAttnFunction``.
        pytorch_fn (Callable): mmcv's ``multi_scale_deformable_attn_pytorch``.
    """

    def __init__(self, compiled: Any, pytorch_fn: DeformableFn) -> None:
        self.compiled = compiled
        self._fn = pytorch_fn
        #: device → whether the compiled kernel runs there
        self.runs: Dict[str, bool] = {}

    def check(self, device: torch.device) -> Optional[str]:
        """Try the kernel on ``device`` once; the log line if it fails
        (None if it runs or was tried before)."""
        if str(device) in self.runs:
            return None
        try:
            with torch.enable_grad():
                value, shapes, start, loc, weights = _probe_inputs(device)
                out = self.compiled.apply(value, shapes, start, loc, weights,
                                          64)
                torch.autograd.grad(out.sum(), (value, loc, weights))
        except Exception as error:  # noqa: BLE001 (any failure of the kernel)
            self.runs[str(device)] = False
            reason = str(error).strip().splitlines() or [type(error).__name__]
            return (f"mmcv's compiled deformable attention is not available "
                    f'on {device} ({reason[0]}): DINO/Deformable DETR run '
                    "through mmcv's PyTorch path (slower, same results)")
        self.runs[str(device)] = True
        return None

    def apply(self, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor,
              im2col_step: int) -> torch.Tensor:
        """As ``MultiScaleDeformableAttnFunction.apply`` (shapes: see
        :class:`PytorchDeformableAttention`)."""
        note = self.check(value.device)
        if note is not None:
            print_log(note, logger='current', level=logging.WARNING)
        if self.runs[str(value.device)]:
            return self.compiled.apply(value, spatial_shapes,
                                       level_start_index, sampling_locations,
                                       attention_weights, im2col_step)
        return self._fn(value, spatial_shapes, sampling_locations,
                        attention_weights)


def ensure_deformable_attention(
        device: Union[None, str, torch.device] = None) -> Optional[str]:
    """Put the check of :class:`_CheckedDeformableAttention` in front of
    mmcv's compiled deformable attention (once per process), and on a CUDA
    ``device`` run it now.

    The package runs this at import without a device, so the first CUDA
    call of any run (the test loop's, the sensitivity step's, a tool's) is
    checked; a tool that wants the line in its own output passes its
    device.

    Args:
        device (str or torch.device, optional): A device to check now (only
            CUDA devices are checked). Defaults to None.

    Returns:
        str or None: The log line when ``device``'s kernel fails (returned
        once); None otherwise (not CUDA, no mmcv ops, the kernel runs, or
        already checked).
    """
    try:
        from mmcv.ops import multi_scale_deform_attn as msda
    except (ImportError, OSError):  # no mmcv ops: no deformable attention
        return None
    kernel = msda.MultiScaleDeformableAttnFunction
    if isinstance(kernel, PytorchDeformableAttention):
        return None  # in the Hessian mode's routing: nothing to check
    if not isinstance(kernel, _CheckedDeformableAttention):
        kernel = _CheckedDeformableAttention(
            kernel, msda.multi_scale_deformable_attn_pytorch)
        msda.MultiScaleDeformableAttnFunction = kernel
    if device is None or torch.device(device).type != 'cuda':
        return None
    device = torch.device(device)
    if device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    return kernel.check(device)

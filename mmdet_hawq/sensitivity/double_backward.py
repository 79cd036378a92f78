"""Kernels that support double backward, for Hessian-vector products.

Two fast kernels of a DETR-family model are first-order only:

* PyTorch's fused scaled-dot-product attention kernels (flash,
  memory-efficient): the math kernel is forced;
* mmcv's compiled multi-scale deformable attention
  (``MultiScaleDeformableAttnFunction``, used on CUDA): its backward is
  ``once_differentiable``, so a Hessian-vector product through it would
  fail or silently lose terms. mmcv's pure-PyTorch implementation
  (``grid_sample``, which has double backward) replaces it for the duration.

On the CPU mmcv already takes the PyTorch path; the context changes nothing
there. The Gauss–Newton estimator needs first-order gradients only and
keeps the fast kernels.
"""
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class _PytorchDeformableAttention:
    """Drop-in for ``MultiScaleDeformableAttnFunction`` (same ``apply``
    signature) that runs mmcv's ``multi_scale_deformable_attn_pytorch``."""

    def __init__(self, pytorch_fn) -> None:
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


@contextmanager
def pytorch_deformable_attention() -> Iterator[None]:
    """mmcv's deformable attention takes its PyTorch path on every device.
    """
    try:
        from mmcv.ops import multi_scale_deform_attn as msda
    except ImportError:  # no mmcv ops: no deformable attention either
        yield
        return
    saved = msda.MultiScaleDeformableAttnFunction
    msda.MultiScaleDeformableAttnFunction = _PytorchDeformableAttention(
        msda.multi_scale_deformable_attn_pytorch)
    try:
        yield
    finally:
        msda.MultiScaleDeformableAttnFunction = saved


@contextmanager
def double_backward_kernels() -> Iterator[None]:
    """The math attention kernel and PyTorch deformable attention."""
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(pytorch_deformable_attention())
        yield

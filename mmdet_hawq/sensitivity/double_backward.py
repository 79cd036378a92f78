"""Which kernels the sensitivity passes run: double backward, and mmcv's
deformable attention where its compiled kernel is missing.

Two fast kernels of a DETR-family model are first-order only:

* PyTorch's fused scaled-dot-product attention kernels (flash,
  memory-efficient): the math kernel is forced;
* mmcv's multi-scale deformable attention, on every device: its compiled
  kernel (``MultiScaleDeformableAttnFunction``, used on CUDA) has a
  ``once_differentiable`` backward, and its pure-PyTorch path (used on the
  CPU) samples with ``grid_sample``, which in many PyTorch versions has no
  double backward on CUDA.
  Both are replaced, for the duration, by the gather-based bilinear sampling
  of :mod:`.bilinear` (same results, double backward on every device).

The Gauss–Newton estimator needs first-order gradients only and keeps the
fast kernels (where mmcv's compiled kernel does not run on a GPU,
:mod:`mmdet_hawq.models.deformable_attention` routes it to the PyTorch
path).
"""
from contextlib import ExitStack, contextmanager
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.deformable_attention import PytorchDeformableAttention
from .bilinear import multi_scale_deformable_attn_bilinear


@contextmanager
def pytorch_deformable_attention() -> Iterator[None]:
    """mmcv's deformable attention runs
    :func:`~.bilinear.multi_scale_deformable_attn_bilinear` on every device
    (in place of both its compiled kernel and its ``grid_sample`` path)."""
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


@contextmanager
def double_backward_kernels() -> Iterator[None]:
    """The math attention kernel and the gather-based deformable attention.
    """
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(pytorch_deformable_attention())
        yield

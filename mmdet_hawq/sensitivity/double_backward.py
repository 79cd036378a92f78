"""Which kernels the sensitivity passes run for double backward.

Fast kernels of a DETR-family model can be first-order only:

* PyTorch's fused scaled-dot-product attention kernels (flash,
  memory-efficient): the math kernel is forced;
* kernels of a family's own layers, swapped by its adapter
  (:func:`~mmdet_hawq.models.double_backward_swaps`): e.g. mmcv's
  multi-scale deformable attention runs the gather-based bilinear sampling
  of :mod:`.bilinear` (same results, double backward on every device).

The Gauss–Newton estimator needs first-order gradients only and keeps the
fast kernels (where mmcv's compiled deformable attention does not run on a
GPU, :mod:`mmdet_hawq.models.compiled_ops` routes it to the PyTorch
path).
"""
from contextlib import contextmanager
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.family import double_backward_swaps


@contextmanager
def double_backward_kernels() -> Iterator[None]:
    """The math attention kernel and every family's double-backward kernels.
    """
    with sdpa_kernel(SDPBackend.MATH), double_backward_swaps():
        yield

"""Multi-scale deformable attention with second derivatives on any device.

mmcv's pure-PyTorch deformable attention samples its value maps with
``F.grid_sample``, whose backward has no derivative on CUDA in many PyTorch
versions (``derivative for aten::grid_sampler_2d_backward is not
implemented``), so a Hessian-vector product through DINO or Deformable DETR
fails on a GPU. Here the bilinear sampling is written in plain
differentiable ops — the floor of the pixel coordinates, the four corner
weights, one ``torch.gather`` from the flattened value maps of all levels,
weight 0 for a corner outside its map — which autograd differentiates any
number of times on every device.

The result is ``F.grid_sample(..., mode='bilinear', padding_mode='zeros',
align_corners=False)`` on the grid ``2·loc − 1``, as mmcv calls it, computed
with the arithmetic of PyTorch's vectorised CPU kernel (fused multiply-adds),
so on an AVX2 or AVX-512 CPU both agree to the bit. The price is memory:
autograd keeps the four gathered corners of every sample, 4·B·heads·d·Q·L·P
values, where mmcv's path keeps the sampled values (a quarter of that) and
recomputes the corners in its backward.
"""
from typing import Tuple

import torch
from torch import Tensor


def bilinear_corners(x: Tensor, y: Tensor, height: Tensor, width: Tensor,
                     start: Tensor) -> Tuple[Tensor, Tensor]:
    """Flat indices and weights of the four corners of bilinear samples.

    Pixel centres are at integer coordinates (``align_corners=False``); a
    corner outside its ``height × width`` map gets index 0 and weight 0
    (zeros padding). Only the weights are differentiable (piecewise
    bilinear in ``x`` and ``y``).

    Args:
        x (Tensor): Column coordinates in pixels, (M, ..., L, P).
        y (Tensor): Row coordinates in pixels, same shape.
        height (Tensor): int64 map heights, (L, 1).
        width (Tensor): int64 map widths, (L, 1).
        start (Tensor): int64 offsets of the maps in the flattened values,
            (L, 1).

    Returns:
        tuple[Tensor, Tensor]: int64 indices into the flattened values and
        weights, each (M, 4, ..., L, P), corners in the order (x0, y0),
        (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1).
    """
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0
    gx, gy = 1 - fx, 1 - fy
    weights = torch.stack([gy * gx, gy * fx, fy * gx, fy * fx], dim=1)
    # clamped to [-2, size] before the cast: outside the map either way
    ix = x0.clamp(min=-2).minimum(width.to(x0.dtype)).long()
    iy = y0.clamp(min=-2).minimum(height.to(y0.dtype)).long()
    cx = torch.stack([ix, ix + 1, ix, ix + 1], dim=1)
    cy = torch.stack([iy, iy, iy + 1, iy + 1], dim=1)
    inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    index = torch.where(inside, start + cy * width + cx, 0)
    return index, weights * inside


def multi_scale_deformable_attn_bilinear(
        value: Tensor, value_spatial_shapes: Tensor,
        sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention by gather-based bilinear sampling.

    A drop-in for mmcv's ``multi_scale_deformable_attn_pytorch`` (same
    arguments, same result) that has double backward on every device. All
    index tensors live on ``value``'s device; nothing is copied to the host.

    Args:
        value (Tensor): (B, N, heads, d), the levels' maps flattened row by
            row one after the other, N = Σ H_l·W_l.
        value_spatial_shapes (Tensor): (L, 2), (H_l, W_l) of each level.
        sampling_locations (Tensor): (B, Q, heads, L, P, 2), (x, y) in
            [0, 1] (relative to each level's map; outside samples zeros).
        attention_weights (Tensor): (B, Q, heads, L, P).

    Returns:
        Tensor: (B, Q, heads·d).
    """
    batch, num_values, heads, dims = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = value_spatial_shapes.to(device=value.device, dtype=torch.long)
    height, width = shapes[:, :1], shapes[:, 1:]
    start = (height * width).cumsum(0) - height * width
    # (B, Q, heads, L, P, 2) -> (B·heads, Q, L, P, 2), as the value maps
    grid = 2 * sampling_locations.transpose(1, 2).flatten(0, 1) - 1
    # pixel coordinates (g + 1)·size/2 − 1/2 (align_corners=False), with one
    # rounding like grid_sample's CPU kernel (a fused multiply-add)
    half = grid.new_full((), -0.5)
    x = torch.addcmul(half, grid[..., 0] + 1, width.to(grid.dtype) / 2)
    y = torch.addcmul(half, grid[..., 1] + 1, height.to(grid.dtype) / 2)
    index, weights = bilinear_corners(x, y, height, width, start)
    maps = value.permute(0, 2, 3, 1).reshape(batch * heads, dims, num_values)
    corners = maps.gather(
        2, index.view(batch * heads, 1, -1).expand(-1, dims, -1))
    corners = corners.view(batch * heads, dims, 4, -1).unbind(2)
    weights = weights.view(batch * heads, 1, 4, -1).unbind(2)
    sampled = corners[0] * weights[0]
    for c in range(1, 4):  # grid_sample's order, fused multiply-adds
        sampled = torch.addcmul(sampled, corners[c], weights[c])
    attention = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, queries, levels * points)
    out = (sampled.view(batch * heads, dims, queries, levels * points) *
           attention).sum(-1)
    return out.view(batch, heads * dims, queries).transpose(1, 2).contiguous()

"""Gather-based deformable attention against mmcv's ``grid_sample`` path,
timed side by side in one run at DINO-R50's sizes (one image at 800×1333:
4 levels, 8 heads, 4 points, 900 queries, d = 32).

Three steps, each the best and median of ``--repeats`` runs of the two
functions interleaved (same load): the forward without gradients, a
forward+backward, and a double backward (the Hessian mode's use). A step
that fails (``grid_sample``'s double backward on CUDA) is printed as such.

Example:
    python benchmarks/benchmark_bilinear.py --threads 1
    python benchmarks/benchmark_bilinear.py --device cuda
"""
import argparse
import time
from typing import Callable, List, Tuple

import torch
from mmcv.ops.multi_scale_deform_attn import \
    multi_scale_deformable_attn_pytorch as grid_sample_path

from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.models.bilinear import \
    multi_scale_deformable_attn_bilinear as gather_path

SHAPES = [[100, 167], [50, 84], [25, 42], [13, 21]]
QUERIES, HEADS, POINTS, DIMS = 900, 8, 4, 32


def make_inputs(device: str) -> Tuple[torch.Tensor, ...]:
    """value (1, N, heads, d), shapes (L, 2), locations (1, Q, heads, L,
    P, 2), softmaxed weights (1, Q, heads, L, P) and an output gradient."""
    gen = torch.Generator(device='cpu').manual_seed(0)
    shapes = torch.tensor(SHAPES)
    num = int((shapes[:, 0] * shapes[:, 1]).sum())
    levels = len(SHAPES)
    value = torch.randn(1, num, HEADS, DIMS, generator=gen)
    loc = torch.rand(1, QUERIES, HEADS, levels, POINTS, 2, generator=gen)
    attn = torch.rand(1, QUERIES, HEADS, levels, POINTS,
                      generator=gen).softmax(-1)
    gout = torch.randn(1, QUERIES, HEADS * DIMS, generator=gen)
    return tuple(t.to(device) for t in (value, shapes, loc, attn, gout))


def steps(inputs) -> List[Tuple[str, Callable]]:
    value, shapes, loc, attn, gout = inputs

    def fresh():
        return [t.clone().requires_grad_() for t in (value, loc, attn)]

    def forward(fn):
        with torch.no_grad():
            fn(value, shapes, loc, attn)

    def forward_backward(fn):
        v, p, a = fresh()
        torch.autograd.grad((fn(v, shapes, p, a) * gout).sum(), (v, p, a))

    def double_backward(fn):
        v, p, a = fresh()
        out = fn(v, shapes, p, a)
        g = torch.autograd.grad(torch.tanh(out).pow(2).sum(), (v, p, a),
                                create_graph=True)
        torch.autograd.grad(sum(gi.sum() for gi in g), (v, p, a))

    return [('forward (no grad)', forward),
            ('forward+backward', forward_backward),
            ('double backward', double_backward)]


def timed(step: Callable, fns, device: str, repeats: int) -> List:
    """Best and median ms per function (None where it fails)."""
    times = {}
    for fn in fns:
        try:
            step(fn)  # warm-up
            times[fn] = []
        except RuntimeError as err:
            times[fn] = str(err).splitlines()[0][:90]
    for _ in range(repeats):
        for fn in fns:
            if isinstance(times[fn], str):
                continue
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(fn)
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            times[fn].append((time.perf_counter() - start) * 1e3)
    return [t if isinstance(t, str) else (min(t), sorted(t)[len(t) // 2])
            for t in (times[fn] for fn in fns)]


def cell(t) -> str:
    """'best / median' ms, or the failure."""
    if isinstance(t, str):
        return f'  failed: {t}'
    return f'{t[0]:>14.1f} /{t[1]:>7.1f}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (default: torch\'s)')
    parser.add_argument('--repeats', type=int, default=15)
    args = parser.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise HawqUserError('no CUDA device is visible: pass --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    fns = (grid_sample_path, gather_path)
    print(f'torch {torch.__version__}, {args.device}, '
          f'{torch.get_num_threads()} threads; maps {SHAPES}, '
          f'{QUERIES} queries, {HEADS} heads, {POINTS} points, d={DIMS}')
    print(f'{"step":<20}{"grid_sample best/median ms":>28}'
          f'{"gather best/median ms":>24}{"gather/grid":>12}')
    inputs = make_inputs(args.device)
    for name, step in steps(inputs):
        old, new = timed(step, fns, args.device, args.repeats)
        ratio = f'{new[0] / old[0]:>12.2f}' if not (
            isinstance(old, str) or isinstance(new, str)) else ''
        print(f'{name:<20}{cell(old):>28}{cell(new):>24}{ratio}',
              flush=True)
    return 0


if __name__ == '__main__':
    run_cli(main)

"""DETR-R50 and DINO-R50 at COCO resolution on a GPU: the sensitivity step's
costs, side by side, and CUDA traces against CPU traces.

For each model (mmdet's COCO config, random weights, one 800x1333 image by
default) it times, after one warm-up each:

* a plain forward+backward of the distillation loss at the 8-bit student;
* one Gauss–Newton sample (first order; mmcv's compiled deformable
  attention on CUDA);
* one Hutchinson sample (double backward; mmcv's PyTorch deformable
  attention, forced by the estimator on every device);

and the peak GPU memory of each. Then it checks, on the small shapes DINO
(random weights, 128x128 images), that the CUDA path gives the same
Gauss–Newton and Hutchinson traces as the CPU path (same draws).

Example (one GPU, about 2 minutes):
    python tools/benchmark_gpu.py --out results/benchmark_gpu.json
CPU smoke run (what the test suite does):
    python tools/benchmark_gpu.py --device cpu --height 64 --width 96 \
        --models configs/_base_/detr_r50_hawq.py --repeats 1 --out x.json
"""
import argparse
import copy
import json
import os
import os.path as osp
import time
from typing import Callable, Dict, List

import torch
from mmengine.config import Config

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.models import class_activation
from mmdet_hawq.quant import quantizable_weights, quantize_weights_
from mmdet_hawq.quant import uniform_plan
from mmdet_hawq.sensitivity import (DistillationObjective, gauss_newton_traces,
                                    hessian_mode, hutchinson_traces)

DEFAULT_MODELS = ('configs/_base_/detr_r50_hawq.py',
                  'configs/_base_/dino_r50_hawq.py')
SMALL_MODEL = 'configs/dino_tiny_shapes.py'


def build(cfg_path: str, device: str) -> torch.nn.Module:
    """The config's model with random weights (no download), eval mode."""
    cfg = Config.fromfile(cfg_path)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.to(device).eval()


def fake_batch(height: int, width: int, device: str, seed: int = 0) -> Dict:
    """One normalised random image and its metainfo."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1, 3, height, width, generator=gen).to(device)
    shape = (height, width)
    sample = DetDataSample(metainfo=dict(
        img_shape=shape, ori_shape=shape, pad_shape=shape,
        batch_input_shape=shape, scale_factor=(1.0, 1.0)))
    return dict(inputs=inputs, data_samples=[sample])


def timed(fn: Callable[[], object], device: str, repeats: int) -> Dict:
    """Median seconds over ``repeats`` after one warm-up, and peak memory."""
    fn()
    times, peak = [], 0
    for _ in range(repeats):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - start)
    times.sort()
    return dict(seconds=times[len(times) // 2],
                peak_mib=round(peak / 2**20, 1) if peak else None)


def objective_at_8bit(model: torch.nn.Module, batches: List[Dict]):
    """Weights, and the distillation objective of the 8-bit student."""
    teacher = copy.deepcopy(model)
    weights = quantizable_weights(model)
    quantize_weights_(weights, uniform_plan(weights, 8))
    obj = DistillationObjective(model, teacher, batches, weights,
                                activation=class_activation(model))
    return weights, obj


def measure(cfg_path: str, args) -> Dict:
    """The three costs of one model at the benchmark resolution."""
    model = build(cfg_path, args.device)
    weights, obj = objective_at_8bit(
        model, [fake_batch(args.height, args.width, args.device)])
    plist = list(weights.values())
    with hessian_mode(model, weights):
        obj.target(0)  # the teacher's outputs, computed once
        rows = dict(
            forward_backward=timed(
                lambda: torch.autograd.grad(obj.loss(0), plist,
                                            allow_unused=True),
                args.device, args.repeats),
            gauss_newton_sample=timed(
                lambda: gauss_newton_traces(weights, obj.gauss_newton_sample,
                                            [0], max_samples=1),
                args.device, args.repeats),
            hutchinson_sample=timed(
                lambda: hutchinson_traces(weights, obj.loss, [0],
                                          max_samples=1),
                args.device, args.repeats))
    base = rows['forward_backward']['seconds']
    for r in rows.values():
        r['x_forward_backward'] = round(r['seconds'] / base, 3)
    return dict(config=cfg_path, type=type(model).__name__,
                weights=len(weights),
                elements=sum(p.numel() for p in plist), **rows)


def traces_on(device: str, samples: int) -> Dict[str, List[float]]:
    """GN and Hutchinson traces of the small DINO at its 8-bit weights."""
    model = build(SMALL_MODEL, device)
    batches = [fake_batch(128, 128, device, seed=s) for s in range(2)]
    weights, obj = objective_at_8bit(model, batches)
    with hessian_mode(model, weights):
        gn = gauss_newton_traces(weights, obj.gauss_newton_sample, [0, 1],
                                 tol=0.0, max_samples=samples, seed=1)
        hut = hutchinson_traces(weights, obj.loss, [0, 1], tol=0.0,
                                max_samples=samples, seed=1)
    return dict(gauss_newton=gn.mean().tolist(),
                hutchinson=hut.mean().tolist())


def max_rel_diff(a: List[float], b: List[float]) -> float:
    return max(abs(x - y) / max(abs(x), abs(y), 1e-30)
               for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--trace-samples', type=int, default=3)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise HawqUserError(
            'no CUDA device is visible: run this on a GPU machine, or pass '
            '--device cpu (with a small --height/--width) for a smoke run')
    register_all_modules()
    result = dict(device=torch.cuda.get_device_name()
                  if args.device.startswith('cuda') else 'cpu',
                  torch=torch.__version__, height=args.height,
                  width=args.width, models=[])
    for path in args.models:
        row = measure(path, args)
        result['models'].append(row)
        print(f"{row['type']:<12} {row['elements']/1e6:6.1f} M weights  " +
              '  '.join(f"{k}: {row[k]['seconds']:.3f} s "
                        f"({row[k]['x_forward_backward']:.2f}x, peak "
                        f"{row[k]['peak_mib']} MiB)"
                        for k in ('forward_backward', 'gauss_newton_sample',
                                  'hutchinson_sample')), flush=True)
    if args.device.startswith('cuda'):
        cpu = traces_on('cpu', args.trace_samples)
        gpu = traces_on(args.device, args.trace_samples)
        result['cuda_vs_cpu'] = {
            k: dict(max_rel_diff=max_rel_diff(cpu[k], gpu[k]), cpu=cpu[k],
                    cuda=gpu[k]) for k in cpu}
        for k, v in result['cuda_vs_cpu'].items():
            print(f"small DINO {k} traces, CUDA vs CPU: max relative "
                  f"difference {v['max_rel_diff']:.2e}")
    os.makedirs(osp.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    run_cli(main)

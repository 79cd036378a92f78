"""DETR-family detectors at COCO resolution on a GPU: the sensitivity step's
costs side by side, where one sample's time goes, and CUDA traces against
CPU traces.

For each model (mmdet's COCO config, random weights, one 800x1333 image by
default) it times, after one warm-up each, in one process:

* ``forward_backward``: a plain forward+backward of the distillation loss at
  the 8-bit student (the Gauss–Newton target's denominator);
* ``gauss_newton_sample``: one Gauss–Newton sample (first order; mmcv's
  compiled deformable attention where it runs);
* ``hvp``: a plain autograd Hessian-vector product over the same weights
  with one probe drawn beforehand (the Hutchinson target's denominator);
* ``hutchinson_sample``: one Hutchinson sample (probe drawn on the device,
  double backward through the twice-differentiable deformable attention);
* ``sensitivity_step``: the Gauss–Newton sensitivity as the hook runs it
  (teacher outputs, 8-bit student, sampling with the hook's stopping rule)
  over ``--step-images`` random images at this resolution, capped at
  ``--step-samples`` samples;

with the peak GPU memory of each, and a profile of one Gauss–Newton sample
(the operators with the most CPU and GPU time). A row that fails records its
error and the run goes on; the JSON is always written. On CUDA it then
checks, on the small shapes DINO (random weights, 128x128), CUDA traces
against CPU traces: the draws come from each device's own generator, so
they agree within their standard errors, not bit for bit.

Example (one GPU, about 3 minutes):
    python benchmarks/benchmark_gpu.py --out results/gpu/benchmark_gpu.json
CPU smoke run (what the test suite does):
    python benchmarks/benchmark_gpu.py --device cpu --height 64 --width 96 \\
        --models configs/dino/dino_tiny_shapes.py --repeats 1 --out x.json
"""
import argparse
import logging
import os
import os.path as osp
import time
import traceback
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from mmengine.logging import MMLogger

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmdet_hawq.api import distillation_objective
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.quant import quantizable_weights
from mmdet_hawq.sensitivity import (gauss_newton_traces, hessian_mode,
                                    hutchinson_traces, rademacher_like,
                                    sample_generator)
from mmdet_hawq.models import ensure_compiled_ops
from mmdet_hawq.sensitivity.double_backward import double_backward_kernels
from mmdet_hawq.engine.cli import read_config, write_json

DEFAULT_MODELS = ('configs/_base_/detr_r50_hawq.py',
                  'configs/_base_/dino_r50_hawq.py',
                  'configs/_base_/deformable_detr_r50_hawq.py')
SMALL_MODEL = 'configs/dino/dino_tiny_shapes.py'
ROWS = ('forward_backward', 'gauss_newton_sample', 'hvp',
        'hutchinson_sample')


def build(cfg_path: str, device: str) -> torch.nn.Module:
    """The config's model with random weights (no download), eval mode."""
    cfg = read_config(cfg_path)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # mmengine logs every parameter's initialisation at INFO (1,700 lines)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model.to(device).eval()


def fake_batch(height: int, width: int, device: str, seed: int = 0) -> Dict:
    """One normalised random image (drawn on the host, so every device gets
    the same image) and its metainfo."""
    gen = torch.Generator(device='cpu').manual_seed(seed)
    inputs = torch.randn(1, 3, height, width, generator=gen).to(device)
    shape = (height, width)
    sample = DetDataSample(metainfo=dict(
        img_shape=shape, ori_shape=shape, pad_shape=shape,
        batch_input_shape=shape, scale_factor=(1.0, 1.0)))
    return dict(inputs=inputs, data_samples=[sample])


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> Dict:
    """Median seconds over ``repeats`` after one warm-up, and peak memory."""
    fn()
    times, peak = [], 0
    for _ in range(repeats):
        sync(device)
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        sync(device)
        if device.startswith('cuda'):
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - start)
    times.sort()
    return dict(seconds=times[len(times) // 2], all_seconds=times,
                peak_mib=round(peak / 2**20, 1) if peak else None)


def guarded(fn: Callable[[], Dict]) -> Dict:
    """``fn()``, or its error (type, message, where) as the row."""
    try:
        return fn()
    except Exception as err:  # a failing row is recorded, the run goes on
        where = traceback.extract_tb(err.__traceback__)[-1]
        return dict(error=f'{type(err).__name__}: {str(err)[:300]}',
                    where=f'{where.filename}:{where.lineno}')


def objective_at_8bit(model: torch.nn.Module, batches: List[Dict]):
    """Weights, and the distillation objective of the 8-bit student."""
    weights = quantizable_weights(model)
    return weights, distillation_objective(model, weights, batches)


def plain_hvp(obj, plist: List[torch.Tensor],
              probe: List[torch.Tensor]) -> None:
    """``H v`` of batch 0's loss by double backward, ``v`` given."""
    with double_backward_kernels():
        grads = torch.autograd.grad(obj.loss(0), plist, create_graph=True,
                                    allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, probe)
                  if g is not None)
        torch.autograd.grad(dot, plist, allow_unused=True)


def gn_profile(weights, obj, device: str, top: int = 12) -> Dict:
    """The operators with the most self CPU and GPU time in one
    Gauss–Newton sample."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                     if device.startswith('cuda') else [])
    sync(device)
    with profile(activities=acts) as prof:
        gauss_newton_traces(weights, obj.gauss_newton_sample, [0],
                            max_samples=1)
        sync(device)
    events = prof.key_averages()

    def rows(attr: str) -> List[Dict]:
        ranked = sorted(events, key=lambda e: getattr(e, attr, 0),
                        reverse=True)[:top]
        return [dict(op=e.key, calls=e.count,
                     self_cpu_ms=round(e.self_cpu_time_total / 1e3, 3),
                     self_device_ms=round(
                         getattr(e, 'self_device_time_total', 0) / 1e3, 3))
                for e in ranked]

    return dict(by_cpu=rows('self_cpu_time_total'),
                by_device=rows('self_device_time_total'))


def sensitivity_step(cfg_path: str, args) -> Dict:
    """The hook's Gauss–Newton sensitivity over N random images."""
    model = build(cfg_path, args.device)
    batches = [fake_batch(args.height, args.width, args.device, seed=s)
               for s in range(args.step_images)]
    sync(args.device)
    start = time.perf_counter()
    weights, obj = objective_at_8bit(model, batches)
    with hessian_mode(model, weights):
        result = gauss_newton_traces(weights, obj.gauss_newton_sample,
                                     list(range(len(batches))),
                                     max_samples=args.step_samples)
    sync(args.device)
    return dict(seconds=time.perf_counter() - start,
                images=len(batches), samples=result.num_samples,
                max_rel_se=float(np.max(result.rel_stderr())))


def measure(cfg_path: str, args) -> Dict:
    """The costs of one model at the benchmark resolution."""
    model = build(cfg_path, args.device)
    note = ensure_compiled_ops(torch.device(args.device))
    weights, obj = objective_at_8bit(
        model, [fake_batch(args.height, args.width, args.device)])
    plist = list(weights.values())
    row = dict(config=cfg_path, type=type(model).__name__,
               weights=len(weights),
               elements=sum(p.numel() for p in plist), kernel_note=note)
    with hessian_mode(model, weights):
        obj.target(0)  # the teacher's outputs, computed once
        probe = rademacher_like(plist, sample_generator(0, 0,
                                                        plist[0].device))
        fns = dict(
            forward_backward=lambda: torch.autograd.grad(
                obj.loss(0), plist, allow_unused=True),
            gauss_newton_sample=lambda: gauss_newton_traces(
                weights, obj.gauss_newton_sample, [0], max_samples=1),
            hvp=lambda: plain_hvp(obj, plist, probe),
            hutchinson_sample=lambda: hutchinson_traces(
                weights, obj.loss, [0], max_samples=1))
        for key in ROWS:
            row[key] = guarded(
                lambda: timed(fns[key], args.device, args.repeats))
            if args.device.startswith('cuda'):
                torch.cuda.empty_cache()
        if not args.no_profile:
            row['gauss_newton_profile'] = guarded(
                lambda: gn_profile(weights, obj, args.device))
    ratios = dict(gauss_newton_sample='forward_backward',
                  hutchinson_sample='hvp', hvp='forward_backward')
    for key, base in ratios.items():
        if 'seconds' in row[key] and 'seconds' in row[base]:
            row[key][f'x_{base}'] = round(
                row[key]['seconds'] / row[base]['seconds'], 3)
    return row


def traces_on(device: str, samples: int) -> Dict[str, Dict[str, List]]:
    """GN and Hutchinson traces (mean, SE) of the small DINO at its 8-bit
    weights on ``device``."""
    model = build(SMALL_MODEL, device)
    batches = [fake_batch(128, 128, device, seed=s) for s in range(2)]
    weights, obj = objective_at_8bit(model, batches)
    out = {}
    with hessian_mode(model, weights):
        for name, run in (('gauss_newton', lambda: gauss_newton_traces(
                weights, obj.gauss_newton_sample, [0, 1], tol=0.0,
                max_samples=samples, seed=1)),
                          ('hutchinson', lambda: hutchinson_traces(
                              weights, obj.loss, [0, 1], tol=0.0,
                              max_samples=samples, seed=1))):
            result = run()
            out[name] = dict(mean=result.mean().tolist(),
                             se=result.stderr().tolist())
    return out


def agreement(cpu: Dict[str, List], gpu: Dict[str, List]) -> Dict:
    """How far apart two independent trace estimates are, in combined
    standard errors, layer by layer."""
    a, b = np.asarray(cpu['mean']), np.asarray(gpu['mean'])
    se = np.sqrt(np.asarray(cpu['se'])**2 + np.asarray(gpu['se'])**2)
    with np.errstate(divide='ignore', invalid='ignore'):
        z = np.where(se > 0, np.abs(a - b) / se, 0.0)
    return dict(layers=len(a), median_z=float(np.median(z)),
                max_z=float(np.max(z)),
                within_3_se=float(np.mean(z <= 3)))


def print_row(row: Dict) -> None:
    parts = []
    for key in ROWS + ('sensitivity_step', ):
        r = row.get(key)
        if r is None:
            continue
        if 'error' in r:
            parts.append(f"{key}: FAILED {r['error'][:120]} at {r['where']}")
            continue
        extra = ', '.join(f'{k[2:]} {v:.2f}x' for k, v in r.items()
                          if k.startswith('x_'))
        what = f" ({r['images']} images, {r['samples']} samples)" \
            if key == 'sensitivity_step' else ''
        parts.append(f"{key}: {r['seconds']:.3f} s{what}"
                     f"{' (' + extra + ')' if extra else ''}"
                     f", peak {r.get('peak_mib')} MiB")
    print(f"{row['type']} ({row['elements'] / 1e6:.1f} M weights)\n  " +
          '\n  '.join(parts), flush=True)
    if row.get('kernel_note'):
        print(f"  note: {row['kernel_note']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--step-images', type=int, default=8,
                        help='images of the sensitivity-step row (0: skip)')
    parser.add_argument('--step-samples', type=int, default=12,
                        help='most samples of the sensitivity-step row')
    parser.add_argument('--trace-samples', type=int, default=8)
    parser.add_argument('--no-profile', action='store_true')
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
                  width=args.width, repeats=args.repeats, models=[])
    os.makedirs(osp.dirname(args.out) or '.', exist_ok=True)

    def save() -> None:
        write_json(args.out, result)

    try:
        for path in args.models:
            row = guarded(lambda: measure(path, args))
            row.setdefault('config', path)
            if args.device.startswith('cuda'):
                torch.cuda.empty_cache()  # the previous row's model is gone
            if args.step_images and 'error' not in row:
                row['sensitivity_step'] = guarded(
                    lambda: sensitivity_step(path, args))
            result['models'].append(row)
            save()
            if 'error' in row:
                print(f"{path}: FAILED {row['error']} at {row['where']}",
                      flush=True)
            else:
                print_row(row)
            if args.device.startswith('cuda'):
                torch.cuda.empty_cache()
        if args.device.startswith('cuda'):
            cpu: Optional[Dict] = guarded(
                lambda: traces_on('cpu', args.trace_samples))
            gpu = guarded(lambda: traces_on(args.device, args.trace_samples))
            if 'error' in cpu or 'error' in gpu:
                result['cuda_vs_cpu'] = dict(cpu=cpu, cuda=gpu)
            else:
                result['cuda_vs_cpu'] = {
                    k: dict(agreement(cpu[k], gpu[k]), cpu=cpu[k],
                            cuda=gpu[k]) for k in cpu}
            for k, v in result['cuda_vs_cpu'].items():
                print(f'small DINO {k} traces, CUDA vs CPU: ' + (
                    f"{v['within_3_se']:.0%} of {v['layers']} layers within "
                    f"3 combined SE (median {v['median_z']:.2f}, max "
                    f"{v['max_z']:.2f})" if 'layers' in v else str(v)))
    finally:
        save()
    print(f'wrote {args.out}')
    failed = [m['config'] for m in result['models'] if 'error' in m or
              'error' in m.get('sensitivity_step', {})]
    failed += ['cuda_vs_cpu'] if any(
        'error' in v for v in result.get('cuda_vs_cpu', {}).values()) else []
    if failed:  # the JSON holds every row; the exit status says some failed
        print(f'failed rows: {", ".join(failed)}')
        return 1
    return 0


if __name__ == '__main__':
    run_cli(main)

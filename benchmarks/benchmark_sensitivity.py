"""Benchmark the trace estimators on a model and calibration set.

For each estimator it prints, measured side by side in one run: the cost of
one sample relative to one plain forward+backward of the distillation loss
over the same images, the median per-layer relative standard error after
``--samples`` samples, and the wall time to reach a median relative SE of
``--target-rse`` (measured if reached within the samples, else extrapolated
with the 1/sqrt(n) law and marked so).

Example:
    python benchmarks/benchmark_sensitivity.py \
        configs/detr/detr_tiny_shapes.py \
        --checkpoint checkpoints/detr_tiny_shapes.pth --metric outquant
"""
import argparse
import copy
import math
import sys
import time

import numpy as np
import torch

from mmdet_hawq.api import CalibrationSettings, distillation_objective
from mmdet_hawq.engine.calibration import build_calibration
from mmdet_hawq.engine.cli import load_detector, read_config, write_json
from mmdet_hawq.quant import quantizable_weights
from mmdet_hawq.sensitivity import (gauss_newton_traces, hessian_mode,
                                    hutchinson_traces, preprocess_batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--metric', choices=['outfloat', 'outquant'],
                   default='outquant')
    p.add_argument('--num-images', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--samples', type=int, default=12)
    p.add_argument('--target-rse', type=float, default=0.05)
    p.add_argument('--estimators', nargs='+',
                   choices=['gauss_newton', 'hutchinson'],
                   default=['gauss_newton', 'hutchinson'])
    p.add_argument('--out', help='JSON file for the results')
    args = p.parse_args()
    cfg = read_config(args.config)
    model = load_detector(cfg, args.checkpoint, '--checkpoint')
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=args.num_images, batch_size=args.batch_size))
    batches = preprocess_batches(model, loader)
    weights = quantizable_weights(model)
    obj = distillation_objective(
        model, weights, batches, 8 if args.metric == 'outquant' else None)
    index = range(len(batches))
    rows = []
    with hessian_mode(model, weights):
        plist = list(weights.values())

        def plain() -> float:
            start = time.perf_counter()
            for i in index:
                torch.autograd.grad(obj.loss(i), plist, allow_unused=True)
            return time.perf_counter() - start

        plain()  # warm-up
        runs = dict(
            gauss_newton=lambda n: gauss_newton_traces(
                weights, obj.gauss_newton_sample, index, tol=0.0,
                max_samples=n),
            hutchinson=lambda n: hutchinson_traces(
                weights, obj.loss, index, tol=0.0, max_samples=n))
        for name in args.estimators:
            # the baseline is re-measured right before each estimator, so a
            # ratio compares runs made under the same machine load
            base = float(np.median([plain() for _ in range(3)]))
            res = runs[name](args.samples)
            per_sample = res.seconds / res.num_samples
            rse = float(np.median(res.rel_stderr()))
            # median rel. SE after k samples, first k where it is reached
            reached = None
            for k in range(3, res.num_samples + 1):
                part = copy.copy(res)
                part.samples = res.samples[:k]
                if float(np.median(part.rel_stderr())) <= args.target_rse:
                    reached = k
                    break
            if reached is not None:
                t_target, how = reached * per_sample, 'measured'
            else:
                n_need = res.num_samples * (rse / args.target_rse)**2
                t_target, how = math.ceil(n_need) * per_sample, 'extrapolated'
            rows.append(dict(
                estimator=name, seconds_per_sample=per_sample,
                cost_vs_fwd_bwd=per_sample / base,
                median_rel_se=rse, samples=res.num_samples,
                negative_layer_means=int((res.mean() < 0).sum()),
                layers=len(res.names),
                baseline_seconds=base,
                seconds_to_target=t_target, target_how=how))
        if 'hutchinson' in args.estimators:
            # per-layer Hutchinson: cost of one layer's sample (one layer)
            one = {n: weights[n] for n in list(weights)[:1]}
            res = hutchinson_traces(one, obj.loss, index, tol=0.0,
                                    max_samples=2, per_layer=True)
            rows.append(dict(estimator='hutchinson_per_layer (1 layer)',
                             seconds_per_sample=res.seconds / 2,
                             cost_vs_fwd_bwd=res.seconds / 2 / base))
    print(f'plain forward+backward over {len(batches)} batches '
          f'({args.num_images} images): {base:.2f} s (last measurement)')
    print('| estimator | s / sample | × fwd+bwd | median rel. SE '
          f'after {args.samples} | negative layer means | time to '
          f'{args.target_rse:.0%} median rel. SE |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        if 'median_rel_se' in r:
            print(f"| {r['estimator']} | {r['seconds_per_sample']:.2f} | "
                  f"{r['cost_vs_fwd_bwd']:.2f} | {r['median_rel_se']:.1%} | "
                  f"{r['negative_layer_means']} of {r['layers']} | "
                  f"{r['seconds_to_target']:.0f} s ({r['target_how']}) |")
        else:
            print(f"| {r['estimator']} | {r['seconds_per_sample']:.2f} | "
                  f"{r['cost_vs_fwd_bwd']:.2f} | - | - | - |")
    if args.out:
        write_json(args.out, dict(plain_fwd_bwd_seconds=base, rows=rows,
                                  args=vars(args)))
    return 0


if __name__ == '__main__':
    sys.exit(main())

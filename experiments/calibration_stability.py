"""The paper's stability check of the calibration set size.

Draws ``--sets`` calibration sets of ``--num-images`` training images (each
with its own seed, class-distribution matched as the hook does), computes on
each the distillation loss of the 8-bit student against the float teacher
(the Out Sen Quant objective), and reports each set's loss, the mean, and
the variance across sets relative to the mean (paper: below 1%).

Example:
    python experiments/calibration_stability.py \
        configs/detr/detr_tiny_shapes.py \
        --checkpoint checkpoints/detr_tiny_shapes.pth
"""
import argparse
import sys

import numpy as np
import torch

from mmdet_hawq.api import CalibrationSettings, distillation_objective
from mmdet_hawq.engine.calibration import build_calibration
from mmdet_hawq.engine.cli import load_detector, read_config, write_json
from mmdet_hawq.quant import quantizable_weights
from mmdet_hawq.sensitivity import (DistillationObjective, hessian_mode,
                                    preprocess_batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--sets', type=int, default=10)
    p.add_argument('--num-images', type=int, default=100)
    p.add_argument('--out', help='JSON file for the results')
    args = p.parse_args()
    cfg = read_config(args.config)
    model = load_detector(cfg, args.checkpoint, '--checkpoint')
    weights = quantizable_weights(model)
    losses = []
    for seed in range(args.sets):
        loader, _ = build_calibration(cfg, CalibrationSettings(
            num_images=args.num_images, seed=seed + 1, batch_size=8))
        batches = preprocess_batches(model, loader)
        if seed == 0:  # the float teacher, the 8-bit student: once
            obj = distillation_objective(model, weights, batches)
        else:
            obj = DistillationObjective(
                model, obj.teacher, batches, weights, obj.lambda_kl,
                obj.temperature, activation=obj.activation)
        with hessian_mode(model, weights):
            with torch.no_grad():
                loss = sum(obj.loss(i).item() for i in range(len(batches)))
        losses.append(loss)
        print(f'set {seed + 1}: loss {loss:.6g}')
    arr = np.array(losses)
    rel_var = float(arr.var(ddof=1) / arr.mean())
    rel_std = float(arr.std(ddof=1) / arr.mean())
    print(f'mean {arr.mean():.6g}  variance/mean {rel_var:.3%}  '
          f'std/mean {rel_std:.3%}')
    if args.out:
        write_json(args.out, dict(losses=losses, mean=float(arr.mean()),
                                  variance_over_mean=rel_var,
                                  std_over_mean=rel_std, args=vars(args)))
    return 0


if __name__ == '__main__':
    sys.exit(main())

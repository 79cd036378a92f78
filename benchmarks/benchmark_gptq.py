"""Benchmark GPTQ's cost against the sensitivity step's, side by side.

Each repeat runs :func:`mmdet_hawq.engine.run.quantize_in_runner` once in one
process, with the sensitivity cache off: the sensitivity step (calibration,
traces, ILP) and then GPTQ on the plan it chose, on the same calibration
images. Printed per repeat and as the median: the seconds of each step and
their ratio (GPTQ / sensitivity; the issue's bar is at most 1.0).

With ``--hessian-memory`` it only builds the config's model (no checkpoint,
no data) and prints the peak memory of GPTQ's ``H`` sums, sequential and
all at once (:func:`~mmdet_hawq.quant.hessian_bytes`).

Example:
    python benchmarks/benchmark_gptq.py configs/detr/detr_tiny_shapes.py \
        --checkpoint checkpoints/detr_tiny_shapes.pth --target-bits 4
    python benchmarks/benchmark_gptq.py \
        configs/detr/detr_r50_outquant_4bit.py \
        --hessian-memory
"""
import argparse
import copy
import os.path as osp
import tempfile

import numpy as np
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from mmdet_hawq.api import QuantSettings
from mmdet_hawq.engine.cli import check_checkpoint, read_config, write_json
from mmdet_hawq.engine.run import quantize_in_runner
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.quant import hessian_bytes, quantizable_weights
from mmdet_hawq.quant.gptq_inputs import gptq_targets


def hessian_memory(cfg: Config) -> int:
    """Print the peak ``H`` memory of GPTQ on the config's model."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    model = MODELS.build(cfg.model)
    targets = gptq_targets(model)
    names = [n for n in quantizable_weights(model) if n in targets]
    seq = hessian_bytes(model, names)
    every = hessian_bytes(model, names, sequential=False)
    largest = max(names, key=lambda n: sum(d * d for d in targets[n].dims))
    print(f'{type(model).__name__}: {len(names)} weights with GPTQ; H '
          f'sums (float64): sequential peak {seq / 2**20:.1f} MiB (largest: '
          f'{largest}, dims {targets[largest].dims}), all at once '
          f'{every / 2**20:.1f} MiB')
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint')
    p.add_argument('--hessian-memory', action='store_true',
                   help='print the H memory of the config\'s model and exit')
    p.add_argument('--target-bits', type=float, default=4)
    p.add_argument('--bit-range', type=int, nargs=2, default=[3, 6])
    p.add_argument('--metric', default='outquant',
                   choices=['losssen', 'outfloat', 'outquant'])
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--gptq-options', nargs='+', action=DictAction,
                   help='GPTQ settings of the hook, e.g. sequential=False')
    p.add_argument('--sensitivity-options', nargs='+', action=DictAction,
                   help='sensitivity settings of the hook (default: the '
                   'hook\'s defaults), e.g. max_samples=20')
    p.add_argument('--out', help='JSON file for the results')
    args = p.parse_args()
    cfg = read_config(args.config)
    if args.hessian_memory:
        return hessian_memory(cfg)
    if not args.checkpoint:
        raise HawqUserError('--checkpoint is needed to time the steps: give '
                            'the .pth to quantize (or --hessian-memory)')
    cfg.load_from = check_checkpoint(args.checkpoint, '--checkpoint')
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if h.get('type') != 'DistillSensitivityHook']
    runs = []
    with tempfile.TemporaryDirectory() as work_dir:
        cfg.work_dir = work_dir
        runner = Runner.from_cfg(cfg)
        runner.load_or_resume()
        model = runner.model
        state = copy.deepcopy(model.state_dict())
        for i in range(args.repeats):
            model.load_state_dict(state)
            settings = QuantSettings(
                metric=args.metric, target_bits=args.target_bits,
                bit_range=tuple(args.bit_range), rounding='gptq',
                gptq=dict(args.gptq_options or {}),
                sensitivity=dict(args.sensitivity_options or {},
                                 use_cache=False))
            s = quantize_in_runner(runner, settings,
                                   osp.join(work_dir, f'run{i}'),
                                   save_packed=False).summary
            # the sensitivity step: calibration set, traces and ILP
            sens = s['calibration_seconds'] + s['plan_seconds']
            runs.append(dict(sensitivity_seconds=sens,
                             gptq_seconds=s['rounding_seconds'],
                             ratio=s['rounding_seconds'] / sens))
            print(f"repeat {i}: sensitivity {sens:.1f} s, "
                  f"GPTQ {s['rounding_seconds']:.1f} s, ratio "
                  f"{runs[-1]['ratio']:.2f}", flush=True)
    ratio = float(np.median([r['ratio'] for r in runs]))
    print(f'{args.config}: GPTQ / sensitivity step, median of '
          f'{len(runs)}: {ratio:.2f}')
    if args.out:
        write_json(args.out, dict(config=args.config, metric=args.metric,
                                  target_bits=args.target_bits,
                                  gptq=args.gptq_options or {},
                                  sensitivity=args.sensitivity_options or {},
                                  runs=runs,
                                  median_ratio=ratio))
    return 0


if __name__ == '__main__':
    run_cli(main)

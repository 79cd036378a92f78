"""Speed-up of N processes over one for the sensitivity step and the whole
PTQ run (``tools/ptq.py`` vs ``tools/dist_ptq.sh``), measured side by side.

Each configuration runs the same config with the cache off and a fixed
number of trace samples: one process with torch's default threads, one
process with one thread, and N processes (torchrun gives each one thread).
It prints the time of the sensitivity samples (rank 0's ``seconds`` in
``traces.json``), of the hook (calibration, traces, ILP, quantization) and of
the whole run, the ratios to the first configuration, how far the N process
traces are from the one-thread traces (they should be equal), and how far
the default-thread traces and plan are from the one-thread ones.

Example:
    python benchmarks/benchmark_dist.py \
        configs/detr/detr_tiny_shapes_outquant_5bit.py \
        --nprocs 2 --samples 10 --out results/benchmark_dist.json
"""
import argparse
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from mmdet_hawq.engine.cli import write_json

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def run(label: str, cmd: list, env: dict, work: str) -> dict:
    """Run one configuration; its timings and traces."""
    print(f'[{label}] {" ".join(cmd)}', flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f'{label} failed (exit {proc.returncode})')
    with open(osp.join(work, 'hawq', 'traces.json')) as f:
        traces = json.load(f)
    with open(osp.join(work, 'hawq', 'plan.json')) as f:
        plan = json.load(f)
    with open(osp.join(work, 'ptq_results.json')) as f:
        results = json.load(f)['quantized']
    return dict(label=label, wall_s=wall, sensitivity_s=traces['seconds'],
                hook_s=results['summary']['seconds'],
                num_samples=len(traces['samples']),
                bbox_mAP=results['metrics']['coco/bbox_mAP'],
                samples=traces['samples'], plan=plan)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', help='default: load_from of the config')
    p.add_argument('--nprocs', type=int, default=2)
    p.add_argument('--samples', type=int, default=10)
    p.add_argument('--num-images', type=int, default=100)
    p.add_argument('--val-images', type=int, default=100,
                   help='evaluate on the first N val images (0: all)')
    p.add_argument('--out', help='JSON file for the results')
    args = p.parse_args()
    opts = [f'custom_hooks.0.calibration.num_images={args.num_images}',
            f'custom_hooks.0.sensitivity.min_samples={args.samples}',
            f'custom_hooks.0.sensitivity.max_samples={args.samples}',
            'custom_hooks.0.sensitivity.use_cache=False']
    if args.val_images:
        opts.append(f'test_dataloader.dataset.indices={args.val_images}')
    extra = ['--checkpoint', args.checkpoint] if args.checkpoint else []
    base_env = dict(os.environ, PYTHONWARNINGS='ignore')
    base_env.pop('OMP_NUM_THREADS', None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [
            ('1 process, default threads', None, {}),
            ('1 process, 1 thread', None, dict(OMP_NUM_THREADS='1')),
            (f'{args.nprocs} processes, 1 thread each', args.nprocs,
             dict(PORT=free_port(), PYTHON=sys.executable)),
        ]
        for i, (label, nprocs, env) in enumerate(configs):
            work = osp.join(tmp, str(i))
            if nprocs is None:
                cmd = [sys.executable, 'tools/ptq.py', args.config]
            else:
                cmd = ['bash', 'tools/dist_ptq.sh', args.config, str(nprocs)]
            cmd += extra + ['--work-dir', work, '--cfg-options', *opts]
            rows.append(run(label, cmd, dict(base_env, **env), work))
    ref, one_thread, dist = rows[0], rows[1], rows[2]
    a, b = np.array(one_thread['samples']), np.array(dist['samples'])
    rel = float((np.abs(b - a) / np.abs(a)).max())
    threads = np.abs(np.array(ref['samples']) - a) / np.abs(a)
    moved = [n for n, bits in one_thread['plan'].items()
             if ref['plan'][n] != bits]
    print(f'\n{args.config}: {args.num_images} calibration images, '
          f'{args.samples} samples; speed-up = time of "{ref["label"]}" / '
          'time')
    print('| configuration | sensitivity s | speed-up | hook s | whole run s'
          ' | speed-up | bbox mAP |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["label"]} | {r["sensitivity_s"]:.1f} | '
              f'{ref["sensitivity_s"] / r["sensitivity_s"]:.2f}x | '
              f'{r["hook_s"]:.1f} | {r["wall_s"]:.1f} | '
              f'{ref["wall_s"] / r["wall_s"]:.2f}x | {r["bbox_mAP"]:.4f} |')
    print(f'max relative difference of the {args.nprocs}-process traces '
          f'from the 1-thread ones: {rel:.2e}')
    print(f'1 process, default vs 1 thread: traces differ by '
          f'{np.median(threads):.1e} (median) / {threads.max():.1e} (max) '
          f'relative; {len(moved)} of {len(ref["plan"])} layers get other '
          f'bits ({", ".join(moved) or "none"})')
    if args.out:
        write_json(args.out, dict(
            config=args.config, num_images=args.num_images,
            samples=args.samples, nprocs=args.nprocs, max_rel_diff=rel,
            threads_median_rel_diff=float(np.median(threads)),
            threads_plan_moved=moved,
            rows=[{k: v for k, v in r.items()
                   if k not in ('samples', 'plan')} for r in rows]))
        print(f'results: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

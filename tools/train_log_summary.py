"""Summarise an mmdet training run: the validation mAP of every evaluated
epoch and the last training losses, as Markdown, from mmengine's own
``vis_data/scalars.json`` files (all runs of a resumed work dir).

Example:
    python tools/train_log_summary.py work_dirs/dino_tiny_shapes \
        --config configs/dino/dino_tiny_shapes.py --command "make train-dino"
"""
import argparse
import glob
import json
import os.path as osp

from mmdet_hawq.errors import HawqUserError, run_cli


def read_scalars(work_dir: str) -> list:
    """Every logged record of every run under ``work_dir``, in run order."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                      'scalars.json')))
    if not files:
        raise HawqUserError(
            f'{work_dir!r} has no */vis_data/scalars.json: pass the work dir '
            'of an mmdet training run')
    records = []
    for path in files:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dir')
    parser.add_argument('--config', default='')
    parser.add_argument('--command', default='')
    args = parser.parse_args()
    records = read_scalars(args.work_dir)
    vals = {}
    for r in records:
        if 'coco/bbox_mAP' in r:
            vals[r['step']] = r  # a resumed run's re-evaluation wins
    train = [r for r in records if 'loss' in r and 'epoch' in r]
    print(f'# Training log summary of {osp.basename(args.work_dir)}\n')
    if args.command:
        print(f'Command: `{args.command}` (config {args.config}), on 2 CPU '
              'cores; read from mmengine\'s scalars.json by '
              '`tools/train_log_summary.py`.\n')
    print('Validation (CocoMetric on the val split, fp32 weights):\n')
    for epoch in sorted(vals):
        r = vals[epoch]
        print(f"- epoch {epoch}: bbox_mAP {r['coco/bbox_mAP']:.4f}, "
              f"mAP_50 {r['coco/bbox_mAP_50']:.4f}")
    if train:
        last = train[-1]
        times = sorted(r['time'] for r in train if 'time' in r)
        print(f"\nLast logged training step: epoch {last['epoch']}, iter "
              f"{last['iter']}, loss {last['loss']:.4f}; median "
              f'{times[len(times) // 2]:.2f} s per iteration over '
              f'{len(times)} logged steps')
    return 0


if __name__ == '__main__':
    run_cli(main)

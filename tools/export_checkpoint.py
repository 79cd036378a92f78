"""Export a training run's last checkpoint as a small shippable file.

Keeps only the model's ``state_dict`` (fp16 unless ``--fp32``) and a little
``meta``; drops the optimizer and the message hub. The source is read, never
modified.

Example:
    python tools/export_checkpoint.py work_dirs/detr_tiny_shapes \
        checkpoints/detr_tiny_shapes.pth
"""
import argparse
import os
import os.path as osp

import torch

from mmdet_hawq.engine import load_checkpoint_file
from mmdet_hawq.errors import HawqUserError, run_cli


def resolve(src: str) -> str:
    """A checkpoint file, or the last checkpoint of a work dir."""
    if osp.isdir(src):
        marker = osp.join(src, 'last_checkpoint')
        if not osp.isfile(marker):
            raise HawqUserError(
                f'{src!r} has no last_checkpoint file: pass a checkpoint '
                'file or a finished training work dir')
        with open(marker) as f:
            return f.read().strip()
    return src


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint file or training work dir')
    parser.add_argument('dst', help='output .pth')
    parser.add_argument('--fp32', action='store_true')
    args = parser.parse_args()
    src = resolve(args.src)
    ckpt = load_checkpoint_file(src)
    state = ckpt.get('state_dict', ckpt)
    dtype = torch.float32 if args.fp32 else torch.float16
    state = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in state.items()
    }
    meta = {k: ckpt.get('meta', {}).get(k) for k in ('epoch', 'iter')}
    meta['source'] = osp.basename(src)
    os.makedirs(osp.dirname(args.dst) or '.', exist_ok=True)
    torch.save(dict(state_dict=state, meta=meta), args.dst)
    print(f'{src} -> {args.dst} ({osp.getsize(args.dst) / 2**20:.2f} MiB)')
    return 0


if __name__ == '__main__':
    run_cli(main)

"""Convert an official facebookresearch/detr checkpoint to mmdet DETR names.

The configs of the plugin also take the official file directly (it is
converted in memory at load time); this writes the converted state dict once,
e.g. for mmdet without the plugin. The input is read, never modified.

Example:
    python tools/convert_detr_checkpoint.py detr-r50-e632da11.pth \
        checkpoints/detr_r50_mmdet.pth --config configs/_base_/detr_r50_hawq.py
"""
import argparse
import copy
import os
import os.path as osp

import torch

from mmdet_hawq.engine import load_checkpoint_file
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.models import convert_official_detr, official_detr_state


def check_against(config: str, state: dict, src: str) -> None:
    """Strict key and shape check against a config's model."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmdet_hawq.engine.checkpoint import check_state_dict
    from mmdet_hawq.engine.cli import read_config
    register_all_modules()
    cfg = read_config(config)
    cfg.model.backbone.init_cfg = None  # every weight comes from src
    check_state_dict(MODELS.build(copy.deepcopy(cfg.model)), state, src)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output .pth (mmdet names)')
    parser.add_argument('--config',
                        help='also check the result loads strictly into this '
                        "config's model")
    args = parser.parse_args()
    if osp.exists(args.src) and osp.exists(args.dst) and \
            osp.samefile(args.src, args.dst):
        raise HawqUserError(
            f'output {args.dst!r} is the input file: give another output '
            'path (the input is never overwritten)')
    official = official_detr_state(load_checkpoint_file(args.src))
    if official is None:
        raise HawqUserError(
            f'{args.src!r} is not an official facebookresearch/detr '
            "checkpoint (no 'model' entry with backbone.0.body.*, "
            'transformer.* and query_embed names): mmdet checkpoints need no '
            'conversion, pass them as they are')
    state = convert_official_detr(official)
    if args.config:
        check_against(args.config, state, args.src)
    os.makedirs(osp.dirname(args.dst) or '.', exist_ok=True)
    torch.save(dict(state_dict=state,
                    meta=dict(converted_from='facebookresearch/detr',
                              source=osp.basename(args.src))), args.dst)
    checked = f', checked against {args.config}' if args.config else ''
    print(f'{args.src} -> {args.dst}: {len(official)} official tensors, '
          f'{len(state)} in mmdet names{checked}')
    return 0


if __name__ == '__main__':
    run_cli(main)

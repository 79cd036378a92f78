"""Evaluate a checkpoint with the config's test loop and save the metrics.

Example:
    python tools/evaluate.py configs/detr/detr_tiny_shapes.py \
        checkpoints/detr_tiny_shapes.pth \
        --out checkpoints/detr_tiny_shapes.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402

from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdet_hawq.engine.cli import (  # noqa: E402
    check_checkpoint, check_work_dir, read_config, write_json)
from mmdet_hawq.errors import run_cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='checkpoint file or URL')
    parser.add_argument('--out', help='JSON file for the metrics')
    parser.add_argument('--work-dir', default='work_dirs/evaluate')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    cfg = read_config(args.config, args.cfg_options)
    cfg.load_from = check_checkpoint(args.checkpoint)
    cfg.work_dir = check_work_dir(args.work_dir)
    metrics = Runner.from_cfg(cfg).test()
    record = dict(metrics, config=args.config,
                  checkpoint=osp.basename(args.checkpoint),
                  command='python tools/evaluate.py ' + ' '.join(sys.argv[1:]))
    if args.out:
        write_json(args.out, record)
    print(json.dumps({k: v for k, v in metrics.items()}, indent=1))
    return 0


if __name__ == '__main__':
    run_cli(main)

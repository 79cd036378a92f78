"""Evaluate an exported ONNX detector on ONNX Runtime or OpenVINO with
mmdet's own post-processing and metric.

Each test image runs through the runtime alone (batch 1); its outputs go
through the detector head's ``predict_by_feat`` and the config's test
evaluator (``CocoMetric``), as in ``tools/evaluate.py``. With --compare, the
PyTorch model of a checkpoint (a packed file: the fake-quantized model) runs
on the same images, one at a time, and the largest absolute differences of
the raw scores and boxes and both models' metrics are reported.

Example:
    python tools/evaluate_onnx.py configs/detr/detr_tiny_shapes.py \
        work_dirs/onnx/detr_uniform4.onnx \
        --compare results/table1/rows/4-bit_uniform_none/packed.pth \
        --out work_dirs/onnx/detr_uniform4_eval.json
    python tools/evaluate_onnx.py configs/detr/detr_tiny_shapes.py \
        work_dirs/onnx/detr_w8a8.onnx --runtime openvino

The convolutions and matrix products the runtime executes are counted by
precision from what it compiled (``kernel_precisions``: ONNX Runtime's
optimised graph, OpenVINO's runtime model).
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from mmengine.config import DictAction  # noqa: E402

from mmdet_hawq.deploy.runtimes import RUNTIMES  # noqa: E402
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_work_dir, read_config, write_json)
from mmdet_hawq.engine.exported import evaluate_exported  # noqa: E402
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('model', help='.onnx file from tools/export_onnx.py '
                        '(on OpenVINO also an IR .xml)')
    parser.add_argument('--runtime', choices=list(RUNTIMES),
                        default='onnxruntime',
                        help='runtime to run it on (default onnxruntime; '
                        'openvino needs pip install -e .[openvino])')
    parser.add_argument('--compare', metavar='CHECKPOINT',
                        help='also run this checkpoint\'s PyTorch model on '
                        'the same images and report the differences')
    parser.add_argument('--threads', type=int, default=1,
                        help='threads of one inference (default 1)')
    parser.add_argument('--max-images', type=int,
                        help='evaluate only the first N test images')
    parser.add_argument('--out', help='JSON file for the metrics')
    parser.add_argument('--work-dir', default='work_dirs/evaluate_onnx')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if args.threads < 1 or (args.max_images is not None
                            and args.max_images < 1):
        raise HawqUserError('--threads and --max-images take positive '
                            'integers')
    cfg = read_config(args.config, args.cfg_options)
    check_work_dir(args.work_dir)
    record = evaluate_exported(cfg, args.model, args.runtime, args.threads,
                               args.max_images, args.compare)
    record.update(config=args.config, model=args.model,
                  command='python tools/evaluate_onnx.py ' +
                  ' '.join(sys.argv[1:]))
    if args.out:
        write_json(args.out, record)
    metrics = {k: v for k, v in record.items() if k.startswith('coco/')}
    print(json.dumps(metrics, indent=1))
    print(f'{args.runtime}: {record["images"]} images, '
          f'{record["s_per_image"] * 1e3:.1f} ms per image '
          f'({args.threads} thread(s)); kernels: '
          + ', '.join(f'{k} {v}' for k, v in
                      record['kernel_precisions'].items()))
    if args.compare:
        diff, det = record['max_abs_diff'], record['detections_max_abs_diff']
        key = next((k for k in metrics if k.endswith('bbox_mAP')), None)
        print(f'PyTorch ({args.compare}) on the same images: max abs diff '
              f'scores {diff["scores"]:.2e}, boxes {diff["boxes"]:.2e}'
              + (f'; {key} {args.runtime} {metrics[key]:.4f} vs PyTorch '
                 f'{record["torch_metrics"][key]:.4f}' if key else ''))
        print(f'detections: max abs diff scores {det["scores"]:.2e}, '
              f'boxes {det["bboxes_px"]:.2e} px; '
              f'{det["images_other_labels"]} image(s) with other '
              'labels or order')
    return 0


if __name__ == '__main__':
    run_cli(main)

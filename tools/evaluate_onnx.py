"""Evaluate an exported ONNX detector under ONNX Runtime with mmdet's own
post-processing and metric.

Each test image runs through ONNX Runtime alone (batch 1); its outputs go
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
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmdet_hawq.engine.cli import check_work_dir, read_config  # noqa: E402
from mmdet_hawq.engine.deploy import (load_for_export,  # noqa: E402
                                      test_images, test_loader)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402


def build_evaluator(cfg, dataset):
    from mmengine.evaluator import Evaluator
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = dataset.metainfo
    return evaluator


def compare_detections(ours, ref, diff: dict) -> None:
    """Update ``diff`` with the largest score and box differences of two
    images' detections (same labels in the same order), else count the
    image."""
    if not torch.equal(ours.labels, ref.labels):
        diff['images_other_labels'] += 1
        return
    if len(ref.labels):
        diff['scores'] = max(diff['scores'], float(
            (ours.scores - ref.scores).abs().max()))
        diff['bboxes_px'] = max(diff['bboxes_px'], float(
            (ours.bboxes - ref.bboxes).abs().max()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('model', help='.onnx file from tools/export_onnx.py')
    parser.add_argument('--compare', metavar='CHECKPOINT',
                        help='also run this checkpoint\'s PyTorch model on '
                        'the same images and report the differences')
    parser.add_argument('--threads', type=int, default=1,
                        help='ONNX Runtime intra-op threads (default 1)')
    parser.add_argument('--max-images', type=int,
                        help='evaluate only the first N test images')
    parser.add_argument('--out', help='JSON file for the metrics')
    parser.add_argument('--work-dir', default='work_dirs/evaluate_onnx')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if not osp.isfile(args.model):
        raise HawqUserError(
            f'ONNX model {args.model!r} does not exist: pass a file written '
            'by tools/export_onnx.py')
    if args.threads < 1 or (args.max_images is not None
                            and args.max_images < 1):
        raise HawqUserError('--threads and --max-images take positive '
                            'integers')
    cfg = read_config(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    check_work_dir(args.work_dir)

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from mmdet_hawq.deploy.onnx_runtime import (OnnxDetector,
                                                detections_from_outputs)
    from mmdet_hawq.models import onnx_outputs
    register_all_modules()
    onnx_model = OnnxDetector(args.model, threads=args.threads)
    if args.compare:
        torch_model = load_for_export(cfg, args.compare)[0]
    else:  # the head's post-processing only: no weights needed
        torch_model = MODELS.build(copy.deepcopy(cfg.model)).eval()
    loader = test_loader(cfg)
    size = len(loader.dataset)
    if args.max_images:
        size = min(size, args.max_images)
    onnx_eval = build_evaluator(cfg, loader.dataset)
    torch_eval = build_evaluator(cfg, loader.dataset) if args.compare \
        else None
    diff = dict(scores=0.0, boxes=0.0)
    det_diff = dict(scores=0.0, bboxes_px=0.0, images_other_labels=0)
    onnx_s = 0.0
    for image, sample in test_images(loader, size):
        ref_sample = copy.deepcopy(sample)
        start = time.perf_counter()
        scores, boxes = onnx_model(image.cpu().numpy())
        onnx_s += time.perf_counter() - start
        onnx_eval.process(detections_from_outputs(
            torch_model, scores, boxes, [sample]))
        if torch_eval is None:
            continue
        with torch.no_grad():
            data = torch_model.data_preprocessor(
                dict(inputs=[image], data_samples=[ref_sample]), False)
            t_scores, t_boxes = onnx_outputs(torch_model, data)
        for key, ours, ref in (('scores', scores, t_scores),
                               ('boxes', boxes, t_boxes)):
            ref = ref.cpu().numpy()[-len(ours):]
            # equal infinities (DDQ-DETR's suppressed queries) differ by 0
            diff[key] = max(diff[key], float(
                np.abs(np.where(ours == ref, 0, ours - ref)).max()))
        t_dets = detections_from_outputs(torch_model, t_scores, t_boxes,
                                         data['data_samples'])
        compare_detections(sample.pred_instances,
                           t_dets[0].pred_instances, det_diff)
        torch_eval.process(t_dets)
    metrics = onnx_eval.evaluate(size)
    record = dict(metrics, config=args.config, model=args.model,
                  images=size, onnx_s_per_image=onnx_s / max(size, 1),
                  command='python tools/evaluate_onnx.py ' +
                  ' '.join(sys.argv[1:]))
    if torch_eval is not None:
        torch_metrics = torch_eval.evaluate(size)
        record.update(compare=args.compare, max_abs_diff=diff,
                      detections_max_abs_diff=det_diff,
                      torch_metrics=torch_metrics)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(record, f, indent=1)
    print(json.dumps(metrics, indent=1))
    per_image_ms = record['onnx_s_per_image'] * 1e3
    print(f'ONNX Runtime: {size} images, {per_image_ms:.1f} ms per image '
          f'({args.threads} thread(s))')
    if torch_eval is not None:
        key = next((k for k in metrics if k.endswith('bbox_mAP')), None)
        print(f'PyTorch ({args.compare}) on the same images: max abs diff '
              f'scores {diff["scores"]:.2e}, boxes {diff["boxes"]:.2e}'
              + (f'; {key} ONNX {metrics[key]:.4f} vs PyTorch '
                 f'{torch_metrics[key]:.4f}' if key else ''))
        print(f'detections: max abs diff scores {det_diff["scores"]:.2e}, '
              f'boxes {det_diff["bboxes_px"]:.2e} px; '
              f'{det_diff["images_other_labels"]} image(s) with other '
              'labels or order')
    return 0


if __name__ == '__main__':
    run_cli(main)

"""Baseline: ONNX Runtime's own static INT8 quantization (QDQ) of the fp32
ONNX export, calibrated on the project's calibration images.

The detector is exported with fp32 weights (as ``tools/export_onnx.py``
does for a float checkpoint), pre-processed as ONNX Runtime recommends
(``quant_pre_process``; without its symbolic shape inference where that
fails) and quantized by ``onnxruntime.quantization.quantize_static`` in QDQ
format (int8 activations and weights, ONNX Runtime's defaults otherwise)
once per calibration method, on the calibration images the project's own
runs use (the train split through the test pipeline, ``num_images`` chosen
with the split's class distribution: ``mmdet_hawq.engine.calibration``).

Variants (which nodes ``quantize_static`` may quantize):

    all             every node ONNX Runtime quantizes by default
    float_decoder   the practitioners' fix: only the backbone, neck and
                    encoder are quantized; the decoder, the heads and the
                    two-stage query selection stay float (nodes_to_exclude)
    float_sampling  deformable models (GridSample in the graph): everything
                    but the sampling-offset and attention-weight
                    projections of the deformable attention
    compute_only    only the ops with integer kernels: Conv, MatMul, Gemm
                    (op_types_to_quantize), no Q/DQ around Add, Reshape,
                    Transpose, Softmax, LayerNormalization, ...

Variant ``all`` runs with every ``--methods`` entry; the other variants with
the method of best mAP (``--fix-method`` to choose it). Each model, the fp32
one included, is evaluated by ``tools/evaluate_onnx.py`` (a subprocess:
ONNX Runtime, the head's ``predict_by_feat``, the config's CocoMetric), and
timed here, batch 1, on the same test images with the same intra-op
threads, the models interleaved image by image (so a busy machine slows
them alike) in ``--latency-rounds`` rounds: the spread of the round medians
is the run-to-run spread. Peak memory (VmHWM) is read in a fresh process per
model (load and one image).

Example:
    OMP_NUM_THREADS=1 python benchmarks/ort_quantize_static.py \
        configs/detr/detr_tiny_shapes.py checkpoints/detr_tiny_shapes.pth \
        --out results/ort_baseline/detr_tiny_shapes.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import collections  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from mmdet_hawq.deploy.baselines import (  # noqa: E402
    calibration_stride, graph_summary, ort_pre_process, ort_quantize_static)
from mmdet_hawq.deploy.timing import measure_memory, time_models  # noqa: E402
from mmdet_hawq.engine.calibration import calibration_images  # noqa: E402
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_checkpoint, check_positive, check_work_dir, read_config,
    write_json)
from mmdet_hawq.engine.exported import evaluate_map  # noqa: E402
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402

#: Calibration methods of ``quantize_static`` tried (lower case → name).
METHODS = {m.lower(): m for m in ('MinMax', 'Entropy', 'Percentile')}
VARIANTS = ('all', 'float_decoder', 'float_sampling', 'compute_only')


def parse_choices(given: Optional[Sequence[str]], known: Dict[str, str],
                  what: str) -> Optional[List[str]]:
    """Names as the user typed them (any case) → canonical names."""
    if given is None:
        return None
    out = []
    for name in given:
        if name.lower() not in known:
            raise HawqUserError(
                f'unknown {what} {name!r}: pass one or more of '
                f'{", ".join(sorted(set(known.values()), key=str.lower))}')
        if known[name.lower()] not in out:
            out.append(known[name.lower()])
    return out


def optimized_ops(path: str, threads: int, work_dir: str) -> Dict[str, int]:
    """Integer kernels in the graph ONNX Runtime optimises ``path`` into
    (level all, as the sessions here run it)."""
    import onnx

    from mmdet_hawq.deploy.runtimes.onnxruntime_session import ort_session
    out = osp.join(work_dir, osp.basename(path)[:-5] + '.optimized.onnx')
    ort_session(path, threads, optimized_file=out)
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    return {k: v for k, v in sorted(ops.items())
            if 'Integer' in k or k.startswith(('QLinear', 'QGemm'))
            or k in ('QuantizeLinear', 'DequantizeLinear')}


def check_outputs(files: Dict[str, str], image: np.ndarray,
                  threads: int) -> Dict[str, Any]:
    """Every model's output shapes and finiteness on one image, and the
    largest difference from the fp32 model's outputs."""
    from mmdet_hawq.deploy.onnx_runtime import OnnxDetector
    ref = OnnxDetector(files['fp32'], threads)(image)
    out = {}
    for name, path in files.items():
        scores, boxes = OnnxDetector(path, threads)(image)
        if scores.shape != ref[0].shape or boxes.shape != ref[1].shape:
            raise RuntimeError(
                f'{name}: outputs {scores.shape} {boxes.shape}, fp32 '
                f'{ref[0].shape} {ref[1].shape}')
        out[name] = dict(
            finite=bool(np.isfinite(scores).all()
                        and np.isfinite(boxes).all()),
            max_abs_diff_scores=float(np.abs(scores - ref[0]).max()),
            max_abs_diff_boxes=float(np.abs(boxes - ref[1]).max()))
    return out


def export_fp32(args: argparse.Namespace, cfg: Any) -> str:
    """The fp32 ONNX model: ``--fp32-onnx``, or exported here."""
    if args.fp32_onnx:
        if not osp.isfile(args.fp32_onnx):
            raise HawqUserError(
                f'--fp32-onnx {args.fp32_onnx!r} does not exist: pass a '
                'file written by tools/export_onnx.py --float-weights, or '
                'leave it out to export the checkpoint here')
        return args.fp32_onnx
    if not args.checkpoint:
        raise HawqUserError(
            'no model: pass a checkpoint (a float .pth or a packed.pth) or '
            '--fp32-onnx FILE')
    from mmdet_hawq.deploy import export_onnx
    from mmdet_hawq.engine.exported import default_input_shape, load_for_export
    shape = default_input_shape(cfg, args.shape)
    model = load_for_export(cfg, args.checkpoint)[0]
    path = osp.join(args.work_dir, 'fp32.onnx')
    export_onnx(model, path, shape)  # a packed file: dequantized weights
    return path


def table(record: Dict[str, Any]) -> str:
    """The markdown table of a run: one row per INT8 model."""
    head = ('variant', 'calibration', 'mAP fp32 / int8',
            'latency fp32 / int8 ms (spread)', 'speedup (per round)',
            'int8 MatMul/Conv/Gemm', 'peak MiB fp32 / int8')
    fp32 = record['fp32']

    def pair(key: str, sub: str, fmt: str, row: Dict[str, Any]) -> str:
        vals = [(r.get(key) or {}).get(sub) if sub else r.get(key)
                for r in (fp32, row)]
        return ' / '.join('-' if v is None else format(v, fmt) for v in vals)

    rows = [head, ['---'] * len(head)]
    for row in record['int8']:
        graph = row['graph']
        rows.append([
            row['variant'], row['method'], pair('mAP', '', '.3f', row),
            pair('latency', 'median_ms', '.2f', row) + ' (' +
            pair('latency', 'spread_ms', '.2f', row).replace(' /', ',') +
            ')',
            format(row.get('speedup_vs_fp32', float('nan')), '.2f') +
            'x (' + ', '.join(format(v, '.2f') for v in
                              row.get('speedup_per_round', [])) + ')',
            f'{graph["int8_compute_nodes"]}/{graph["compute_nodes"]}',
            pair('memory', 'peak_mib', '.0f', row)])
    return '\n'.join('| ' + ' | '.join(r) + ' |' for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?',
                        help='float checkpoint (or packed .pth: its '
                        'dequantized weights) to export with fp32 weights')
    parser.add_argument('--fp32-onnx', metavar='FILE',
                        help='take this fp32 export instead of exporting')
    parser.add_argument('--methods', nargs='+', default=list(
        METHODS.values()), help='calibration methods of variant all '
        '(default: MinMax Entropy Percentile)')
    parser.add_argument('--variants', nargs='+',
                        help='default: all float_decoder compute_only, '
                        'and float_sampling where the graph has '
                        'GridSample')
    parser.add_argument('--fix-method',
                        help='calibration method of the other variants '
                        '(default: the one of best mAP in variant all)')
    parser.add_argument('--per-channel', action='store_true',
                        help='per-channel weight scales (ONNX Runtime\'s '
                        'default: per tensor)')
    parser.add_argument('--num-images', type=int, default=None,
                        help='calibration images (default: the project\'s, '
                        '100)')
    parser.add_argument('--seed', type=int, default=None,
                        help='seed of the calibration choice (default 0)')
    parser.add_argument('--calib-stride', type=int, default=10,
                        help='calibrate in chunks of up to this many images '
                        '(ORT\'s CalibStridedMinMax; 0: all at once; '
                        'default 10)')
    parser.add_argument('--shape', type=int, nargs='+', metavar='N',
                        help='input H W (default: the test pipeline\'s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='ONNX Runtime intra-op threads of every '
                        'evaluation and timing (default 1)')
    parser.add_argument('--max-images', type=int,
                        help='evaluate only the first N test images')
    parser.add_argument('--latency-images', type=int, default=50,
                        help='timed test images per round (default 50)')
    parser.add_argument('--latency-rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--no-eval', action='store_true',
                        help='skip the mAP evaluation')
    parser.add_argument('--no-memory', action='store_true',
                        help='skip the peak-memory processes')
    parser.add_argument('--work-dir', default=None,
                        help='default: work_dirs/ort_quantize_static/'
                        '<config name>')
    parser.add_argument('--out', help='JSON file for the results')
    args = parser.parse_args()
    methods = parse_choices(args.methods, METHODS, 'calibration method')
    fix = parse_choices([args.fix_method] if args.fix_method else None,
                        METHODS, 'calibration method')
    variants = parse_choices(args.variants, {v: v for v in VARIANTS},
                             'variant')
    check_positive(args, ('num_images', 'threads', 'max_images',
                          'latency_images', 'latency_rounds'))
    if args.warmup < 0 or args.calib_stride < 0:
        raise HawqUserError('--warmup and --calib-stride take non-negative '
                            'integers')
    if args.checkpoint:
        check_checkpoint(args.checkpoint, urls=False)
    cfg = read_config(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    args.work_dir = args.work_dir or osp.join('work_dirs',
                                              'ort_quantize_static', name)
    check_work_dir(args.work_dir)
    if args.out:
        check_work_dir(osp.dirname(osp.abspath(args.out)))
    logging.getLogger().setLevel(logging.ERROR)  # ORT's progress notes

    import onnx
    import onnxruntime
    fp32 = export_fp32(args, cfg)
    graph = onnx.load(fp32, load_external_data=False).graph
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    deformable = any(n.op_type == 'GridSample' for n in graph.node)
    del graph
    if variants is None:
        variants = ['all', 'float_decoder', 'compute_only'] + \
            (['float_sampling'] if deformable else [])
    elif 'float_sampling' in variants and not deformable:
        raise HawqUserError(
            f'variant float_sampling: {fp32!r} has no deformable-attention '
            'sampling (no GridSample node): leave it out of --variants')
    from mmdet_hawq.api import CalibrationSettings
    default = CalibrationSettings()
    num_images = args.num_images or default.num_images
    seed = default.seed if args.seed is None else args.seed
    images = calibration_images(cfg, num_images, seed, shape[2:])
    stride = calibration_stride(len(images), args.calib_stride)
    pre = osp.join(args.work_dir, 'fp32_pre.onnx')
    preprocessing = ort_pre_process(fp32, pre)
    print(f'{fp32}: input {shape}; {len(images)} calibration images; '
          f'{preprocessing}', flush=True)

    from mmdet_hawq.deploy.onnx_runtime import OnnxDetector
    files = {'fp32': fp32}
    rows: List[Dict[str, Any]] = []
    failed: List[Dict[str, str]] = []
    fp32_row: Dict[str, Any] = dict(model=fp32, graph=graph_summary(fp32))
    if not args.no_eval:
        fp32_row.update(evaluate_map(cfg, fp32, threads=args.threads,
                                     max_images=args.max_images))
        print(f'fp32: mAP {fp32_row["mAP"]:.3f}', flush=True)

    def run(variant: str, method: str) -> None:
        key = f'{variant}_{method.lower()}'
        path = osp.join(args.work_dir, f'int8_{key}.onnx')
        step = 'quantize_static'
        try:
            made = ort_quantize_static(pre, path, images, method, variant,
                                       args.per_channel, stride)
            step = 'ONNX Runtime'
            OnnxDetector(path, args.threads)(images[0])
            row = dict(variant=variant, method=method, model=path, **made)
            row['graph'] = {k: row.pop(k) for k in (
                'quantize_linear', 'dequantize_linear', 'compute_nodes',
                'int8_compute_nodes', 'bytes')}
            row['optimized_integer_ops'] = optimized_ops(
                path, args.threads, args.work_dir)
            if not args.no_eval:
                step = 'evaluation'
                row.update(evaluate_map(cfg, path, threads=args.threads,
                                        max_images=args.max_images))
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            text = ' '.join(str(err).split())
            if len(text) > 400:  # the start says where, the end what
                text = text[:150] + ' ... ' + text[-250:]
            failed.append(dict(variant=variant, method=method, step=step,
                               error=f'{type(err).__name__}: {text}'))
            print(f'{variant} {method}: {step} failed: '
                  f'{failed[-1]["error"]}', flush=True)
            return
        files[key] = path
        rows.append(row)
        print(f'{variant} {method}: {row["graph"]["int8_compute_nodes"]}/'
              f'{row["graph"]["compute_nodes"]} MatMul/Conv/Gemm int8'
              + (f', mAP {row["mAP"]:.3f}' if 'mAP' in row else ''),
              flush=True)

    if 'all' in variants:
        for method in methods:
            run('all', method)
    if fix:
        best = fix[0]
    elif rows and not args.no_eval:
        best = max(rows, key=lambda r: r['mAP'])['method']
    else:
        best = methods[0]
    for variant in variants:
        if variant != 'all':
            run(variant, best)

    outputs = check_outputs(files, images[0], args.threads)
    from mmdet_hawq.engine.exported import test_images, test_loader
    timed = [img.cpu().numpy().astype(np.float32)[None] for img, _ in
             test_images(test_loader(cfg), args.latency_images)]
    latency = time_models({k: (v, 'onnxruntime', {})
                           for k, v in files.items()}, timed, args.threads,
                          args.latency_rounds, args.warmup)
    fp32_row['latency'] = latency['fp32']
    if not args.no_memory:
        fp32_row['memory'] = measure_memory(fp32, threads=args.threads)
    for row in rows:
        key = f'{row["variant"]}_{row["method"].lower()}'
        row['latency'] = latency[key]
        row['outputs_vs_fp32'] = outputs[key]
        row['speedup_vs_fp32'] = (latency['fp32']['median_ms'] /
                                  latency[key]['median_ms'])
        row['cpu_speedup_vs_fp32'] = (latency['fp32']['cpu_median_ms'] /
                                      latency[key]['cpu_median_ms'])
        # paired by round: a slow spell of the machine slows both
        row['speedup_per_round'] = [
            a / b for a, b in zip(latency['fp32']['round_medians_ms'],
                                  latency[key]['round_medians_ms'])]
        if not args.no_memory:
            row['memory'] = measure_memory(row['model'],
                                           threads=args.threads)
    record = dict(
        config=args.config, checkpoint=args.checkpoint, input_shape=shape,
        onnxruntime=onnxruntime.__version__, onnx=onnx.__version__,
        calibration=dict(num_images=len(images), seed=seed,
                         source='train split, test pipeline, class-'
                         'distribution matched (mmdet_hawq.engine.'
                         'calibration.build_calibration)',
                         calib_strided=stride),
        preprocessing=preprocessing, per_channel=args.per_channel,
        quant_format='QDQ', activation_type='QInt8', weight_type='QInt8',
        best_method=best, threads=args.threads,
        omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
        latency_images=len(timed), latency_rounds=args.latency_rounds,
        fp32=fp32_row, int8=rows, failed=failed,
        command='python benchmarks/ort_quantize_static.py ' +
        ' '.join(sys.argv[1:]))
    text = table(record)
    print(f'\n{len(timed)} test images x {args.latency_rounds} rounds, '
          f'batch 1, ORT intra-op threads {args.threads}, OMP_NUM_THREADS='
          f'{record["omp_num_threads"]}; best calibration: {best}\n')
    print(text)
    for fail in failed:
        print(f'{fail["variant"]} {fail["method"]}: {fail["step"]} failed: '
              f'{fail["error"]}')
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == '__main__':
    run_cli(main)

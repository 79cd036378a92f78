"""Benchmark INT8 deployment side by side: the fp32 ONNX model, our W8A8
(and W4A8) exports, and ONNX Runtime's own ``quantize_static``, timed in one
run under ONNX Runtime, batch 1.

Models:

    fp32                 the fp32 export of the checkpoint (or of random
                         weights, --random-weights)
    w8a8                 ours: every weight at 8 bits per tensor, every
                         activation site at 8 bits (MSE ranges), exported
                         with the integer-kernel layout (QLinearConv,
                         MatMulIntegerToFloat); made here by
                         ``mmdet_hawq.quantize`` on the calibration images,
                         or taken from a ptq run (--run w8a8=WORK_DIR)
    <name>               any other ptq run with activations (--run
                         w4a8=WORK_DIR): its packed.pth and activations.json
    <name>_weight_only   a run's weights with float activations
                         (--weight-only NAME): INT4/INT8 DequantizeLinear
    <model>_matmulnbits  with --int4-matmul, each of ours with its weights
                         of at most 4 bits in ONNX Runtime's 4-bit kernel
                         MatMulNBits (accuracy level 4: int8 dot products)
    ort_quantize_static  ONNX Runtime's quantize_static of the fp32 export
                         on the same calibration images: QDQ, MinMax, its
                         defaults otherwise (every op it quantizes, int8
                         activations, per-tensor weights)
    ort_quantize_static_u8_per_channel
                         the same with uint8 activations (ours' type; with
                         int8 ones ONNX Runtime fuses fewer convolutions)
                         and per-channel weights: its fastest settings here
    ort_quantize_static_compute_u8_per_channel
                         likewise, Conv/MatMul/Gemm only (no Q/DQ around
                         Add, Softmax, ...: its most accurate on the small
                         models)

All models run interleaved image by image (the order rotated) in --rounds
rounds on the same images (``mmdet_hawq.deploy.timing.time_models``),
so a slow spell of the shared machine slows them alike; ``speedup_vs_fp32``
is the fp32 model's median over the model's, and ``speedup_per_round`` the
same per round (its spread is the run-to-run spread). A baseline that
ONNX Runtime cannot run is listed under ``failed`` with its error (e.g.
per-channel QLinearMatMul on DINO in 1.20.1). The integer kernels
of the graph ONNX Runtime optimises each model into are counted. With
--eval, each model's mAP comes from tools/evaluate_onnx.py (ONNX Runtime,
the head's predict_by_feat, mmdet's CocoMetric), beside the PyTorch
fake-quant mAP of a ptq run (its ptq_results.json); peak memory from a fresh
process per model.

With --random-weights (timing only: the R50 configs at 800x1333, whose COCO
images and checkpoints this machine does not have), the model keeps its
initial weights and the calibration and timed images are uniform noise.

Examples:
    OMP_NUM_THREADS=1 python benchmarks/benchmark_int8.py \
        configs/detr/detr_r50_uniform_8bit.py --random-weights \
        --shape 800 1333 --calib-stride 1 \
        --out results/int8/detr_r50_800x1333.json
    OMP_NUM_THREADS=1 python benchmarks/benchmark_int8.py \
        configs/detr/detr_tiny_shapes.py checkpoints/detr_tiny_shapes.pth \
        --run w8a8=work_dirs/act/detr_w8a8 --run w4a8=work_dirs/act/detr_w4a8 \
        --eval --out results/int8/detr_tiny_shapes.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from mmdet_hawq.deploy.baselines import (  # noqa: E402
    calibration_stride, ort_pre_process, ort_quantize_static)
from mmdet_hawq.deploy.timing import measure_memory, time_models  # noqa: E402
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_positive, check_work_dir, read_config, write_json)
from mmdet_hawq.engine.exported import (evaluate_map,  # noqa: E402
                                      ptq_run_files, quantize_w8a8)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402

#: ONNX Runtime baselines: name → (``quantize_static`` variant,
#: per-channel weights, QUInt8 activations).
ORT_VARIANTS = {
    'ort_quantize_static': ('all', False, False),
    'ort_quantize_static_u8_per_channel': ('all', True, True),
    'ort_quantize_static_compute_u8_per_channel': ('compute_only', True,
                                                   True),
}


def parse_runs(given: List[str]) -> Dict[str, Tuple[str, str, str]]:
    """``NAME=WORK_DIR`` → name → (packed.pth, activations.json, work dir).
    """
    runs = {}
    for item in given:
        name, sep, folder = item.partition('=')
        if not sep or not name or name == 'fp32' or name in ORT_VARIANTS:
            raise HawqUserError(
                f'--run {item!r} is not NAME=WORK_DIR with a new NAME: pass '
                'e.g. --run w4a8=work_dirs/act/detr_w4a8')
        files = ptq_run_files(folder, ('packed.pth', 'activations.json'))
        runs[name] = (files[0], files[1], folder)
    return runs


def op_time_shares(path: str, image: np.ndarray, threads: int,
                   work_dir: str) -> Dict[str, float]:
    """Share of one image's kernel time per op type, from ONNX Runtime's
    profiler (after one warm-up run), largest first."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = osp.join(work_dir, 'profile')
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: image}
    session.run(None, feed)  # warm-up
    session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get('name') == 'model_run']
    last = runs[-1]['ts'] if runs else 0
    times: Dict[str, float] = {}
    for e in events:
        if e.get('cat') == 'Node' and e.get('ts', 0) >= last and \
                e.get('name', '').endswith('_kernel_time'):
            op = e.get('args', {}).get('op_name', '?')
            times[op] = times.get(op, 0.0) + e['dur']
    total = sum(times.values()) or 1.0
    return {op: t / total for op, t in sorted(times.items(),
                                              key=lambda x: -x[1])}


def step(what: str) -> None:
    """One progress line, with the time."""
    print(f'[{time.strftime("%H:%M:%S")}] {what}', flush=True)


def fake_quant_map(folder: str) -> Optional[float]:
    """The PyTorch fake-quant mAP of a ptq run (its ptq_results.json)."""
    path = osp.join(folder, 'ptq_results.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        metrics = json.load(f)['quantized']['metrics']
    return next(v for k, v in metrics.items() if k.endswith('bbox_mAP'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?',
                        help='float checkpoint (not with --random-weights)')
    parser.add_argument('--random-weights', action='store_true',
                        help='time the config\'s model with its initial '
                        'weights on noise images (no mAP)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: the test pipeline\'s)')
    parser.add_argument('--run', action='append', default=[],
                        metavar='NAME=WORK_DIR',
                        help='a ptq run with activations to deploy too')
    parser.add_argument('--weight-only', action='append', default=[],
                        metavar='NAME', help='also export --run NAME '
                        'with float activations (its weights only)')
    parser.add_argument('--int4-matmul', action='store_true',
                        help='also export each of ours with MatMulNBits '
                        'for its weights of at most 4 bits '
                        '(<model>_matmulnbits)')
    parser.add_argument('--calib-images', type=int, default=None,
                        help='calibration images (default: the project\'s '
                        '100; 4 noise images with --random-weights)')
    parser.add_argument('--calib-stride', type=int, default=10,
                        help='quantize_static calibrates this many images '
                        'at a time (its CalibStridedMinMax; it holds every '
                        'intermediate tensor of them: 1 for the R50 models '
                        'at 800x1333; default 10)')
    parser.add_argument('--images', type=int, default=20,
                        help='timed images per round (default 20)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--eval', action='store_true',
                        help='mAP of every model under ONNX Runtime')
    parser.add_argument('--max-images', type=int,
                        help='evaluate only the first N test images')
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument('--profile', action='store_true',
                        help="ONNX Runtime's profile of one image per "
                        'model: the share of the time per op type')
    parser.add_argument('--ort', nargs='*', default=list(ORT_VARIANTS),
                        choices=list(ORT_VARIANTS), metavar='VARIANT',
                        help='ONNX Runtime baselines to make (default: all '
                        'three; none: --ort with no name)')
    parser.add_argument('--work-dir', default=None)
    parser.add_argument('--out', help='JSON file for the results')
    args = parser.parse_args()
    check_positive(args, ('images', 'rounds', 'threads',
                                   'calib_images', 'calib_stride'))
    if args.warmup < 0:
        raise HawqUserError(f'--warmup takes a non-negative integer, not '
                            f'{args.warmup}')
    if args.random_weights == bool(args.checkpoint):
        raise HawqUserError(
            'pass a float checkpoint, or --random-weights (timing only), '
            'not both or neither')
    if args.random_weights and args.eval:
        raise HawqUserError('--eval needs a checkpoint: random weights '
                            'have no mAP')
    runs = parse_runs(args.run)
    cfg = read_config(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    args.work_dir = args.work_dir or osp.join('work_dirs', 'benchmark_int8',
                                              name)
    check_work_dir(args.work_dir)
    if args.out:  # before the long run, not after it
        check_work_dir(osp.dirname(osp.abspath(args.out)))
    logging.getLogger().setLevel(logging.ERROR)

    import onnx

    from mmdet_hawq.deploy import export_onnx
    from mmdet_hawq.deploy.onnx_integer import integer_kernels
    from mmdet_hawq.deploy.runtimes.onnxruntime_session import ort_session
    from mmdet_hawq.engine.exported import (benchmark_inputs,
                                          default_input_shape,
                                          load_for_export)
    from mmdet_hawq.quant.activations import load_ranges
    shape = tuple(args.shape) if args.shape else default_input_shape(cfg)
    model, calib, timed = benchmark_inputs(
        cfg, None if args.random_weights else args.checkpoint, shape,
        args.calib_images, args.images)
    files = {'fp32': osp.join(args.work_dir, 'fp32.onnx')}
    step('exporting fp32')
    export_onnx(model, files['fp32'], shape)
    rows: Dict[str, Dict[str, Any]] = {'fp32': {}}
    if 'w8a8' not in runs:
        import copy
        start = time.perf_counter()
        reference = copy.deepcopy(model)  # without the quantizers' hooks
        step(f'quantizing w8a8 on {len(calib)} calibration images')
        packed, ranges = quantize_w8a8(model, calib)
        step('exporting w8a8')
        reference.load_state_dict(model.state_dict())
        files['w8a8'] = osp.join(args.work_dir, 'w8a8.onnx')
        made = export_onnx(reference, files['w8a8'], shape, packed=packed,
                           activations=ranges)
        rows['w8a8'] = dict(sites=len(ranges), made_s=round(
            time.perf_counter() - start, 1), **{k: made[k] for k in (
                'folded_batch_norms', 'int32_biases')})
        del reference
    unknown = [n for n in args.weight_only if n not in runs]
    if unknown:
        raise HawqUserError(
            f'--weight-only {unknown[0]}: no --run of that name; give the '
            f'NAME of a --run ({", ".join(runs) or "none given"})')
    exports = [(n, n, True) for n in runs] + \
        [(f'{n}_weight_only', n, False) for n in args.weight_only]
    for key, run_name, with_ranges in exports:
        packed_file, ranges_file, folder = runs[run_name]
        run_model, packed = load_for_export(cfg, packed_file)
        ranges = load_ranges(ranges_file) if with_ranges else None
        for nbits in (False, True) if args.int4_matmul else (False, ):
            name = f'{key}_matmulnbits' if nbits else key
            step(f'exporting {name}')
            files[name] = osp.join(args.work_dir, f'{name}.onnx')
            made = export_onnx(run_model, files[name], shape,
                               packed=packed, activations=ranges,
                               int4_matmul=nbits)
            if nbits and not made['matmul_nbits']:  # no weight <= 4 bits
                del files[name]
                continue
            rows[name] = dict(run=folder, sites=len(ranges or {}),
                              pytorch_mAP=fake_quant_map(folder)
                              if with_ranges else None,
                              **{k: v for k, v in made.items() if k in (
                                  'folded_batch_norms', 'int32_biases',
                                  'matmul_nbits')})
    del model
    pre = osp.join(args.work_dir, 'fp32_pre.onnx')
    if args.ort:
        step('quant_pre_process of the fp32 model')
        ort_pre_process(files['fp32'], pre)
    from mmdet_hawq.deploy.onnx_runtime import OnnxDetector
    failed = []
    for key in args.ort:
        variant, per_channel, u8 = ORT_VARIANTS[key]
        files[key] = osp.join(args.work_dir, f'{key}.onnx')
        step(f'{key}: quantize_static on {len(calib)} calibration images')
        try:
            made = ort_quantize_static(
                pre, files[key], calib, 'MinMax', variant, per_channel,
                calibration_stride(len(calib), args.calib_stride), u8)
            OnnxDetector(files[key], args.threads)(calib[0])
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            text = ' '.join(str(err).split())
            failed.append(dict(variant=key, error=f'{type(err).__name__}: '
                               f'{text[:150]} ... {text[-250:]}'))
            print(f'{key}: failed: {failed[-1]["error"]}', flush=True)
            del files[key]
            continue
        rows[key] = dict(variant_of_quantize_static=variant,
                         per_channel=per_channel, u8_activations=u8,
                         quantize_s=made['quantize_s'],
                         quantize_linear=made['quantize_linear'])
    print(f'{name}: {shape[0]}x{shape[1]}, models {list(files)}',
          flush=True)
    for key, path in files.items():
        step(f'{key}: optimised graph' + (', mAP' if args.eval else '') +
             ('' if args.no_memory else ', peak memory'))
        optimized = osp.join(args.work_dir, f'{key}.optimized.onnx')
        ort_session(path, args.threads, optimized_file=optimized)
        rows[key]['integer_kernels'] = integer_kernels(onnx.load(optimized))
        rows[key]['bytes'] = osp.getsize(path)
        if args.eval:
            rows[key].update(evaluate_map(cfg, path, threads=args.threads,
                                          max_images=args.max_images))
            print(f'{key}: mAP {rows[key]["mAP"]:.3f} under ONNX Runtime',
                  flush=True)
        if not args.no_memory:
            rows[key]['memory'] = measure_memory(path, threads=args.threads)
    if args.profile:
        for key, path in files.items():
            step(f'{key}: profile of one image')
            rows[key]['profile'] = op_time_shares(path, timed[0],
                                                  args.threads,
                                                  args.work_dir)
    step(f'timing {len(files)} models on {len(timed)} images, '
         f'{args.rounds} rounds')
    latency = time_models({k: (v, 'onnxruntime', {})
                           for k, v in files.items()}, timed, args.threads,
                          args.rounds, args.warmup)
    base = latency['fp32']
    results = []
    for key in files:
        lat = latency[key]
        row = dict(variant=key, model=files[key], latency=lat,
                   speedup_vs_fp32=base['median_ms'] / lat['median_ms'],
                   speedup_per_round=[
                       b / v for b, v in zip(base['round_medians_ms'],
                                             lat['round_medians_ms'])],
                   **rows[key])
        results.append(row)
    print(table(results))
    if args.out:
        write_json(args.out, dict(
            config=args.config, checkpoint=args.checkpoint,
            random_weights=args.random_weights, input_shape=list(shape),
            threads=args.threads, calibration_images=len(calib),
            timed_images=len(timed), rounds=args.rounds, results=results,
            failed=failed, command='python benchmarks/benchmark_int8.py ' +
            ' '.join(sys.argv[1:])))
    return 0


def table(results: List[Dict[str, Any]]) -> str:
    """Markdown: one row per model."""
    lines = ['| model | mAP ORT (PyTorch) | latency ms median (round '
             'spread) | speedup vs fp32 (per round) | QLinearConv / integer '
             'MatMul | peak MiB |', '|---|---|---|---|---|---|']
    for r in results:
        k = r['integer_kernels']
        mm = sum(v for op, v in k.items() if 'MatMul' in op and
                 op not in ('MatMul', 'FusedMatMul'))
        m = r.get('mAP')
        torch_map = r.get('pytorch_mAP')
        lines.append(
            f'| {r["variant"]} | '
            f'{"-" if m is None else f"{m:.3f}"}'
            f'{"" if torch_map is None else f" ({torch_map:.3f})"} | '
            f'{r["latency"]["median_ms"]:.1f} '
            f'({r["latency"]["spread_ms"]:.1f}) | '
            f'{r["speedup_vs_fp32"]:.2f}x (' + ', '.join(
                f'{v:.2f}' for v in r['speedup_per_round']) + ') | '
            f'{k.get("QLinearConv", 0)} / {mm} | '
            f'{r.get("memory", {}).get("peak_mib", float("nan")):.0f} |')
    return '\n'.join(lines)


if __name__ == '__main__':
    run_cli(main)

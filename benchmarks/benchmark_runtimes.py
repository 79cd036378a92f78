"""The fastest deployed model a CPU user can get, side by side in one run:
fp32 on ONNX Runtime and OpenVINO, ours on both, NNCF's INT8 variants and
ONNX Runtime's quantize_static.

Rows (each a file on a runtime; ``--rows`` picks some):

    fp32_onnxruntime        the fp32 export on ONNX Runtime
    fp32_openvino_f32       the same on OpenVINO, float layers in f32
    fp32_openvino           the same with OpenVINO's default precision (bf16
                            on CPUs with AVX-512 BF16 or AMX, this one's)
    ours_onnxruntime        ours (--run NAME=WORK_DIR: a ptq run with
                            activations; with --random-weights, W8A8 made
                            here) on ONNX Runtime's integer kernels
    ours_openvino_f32       the same file on OpenVINO, float layers in f32
    ours_openvino           ... with OpenVINO's default precision
    nncf_defaults           nncf.quantize (OpenVINO backend) of the fp32
                            export, its defaults
    nncf_transformer        ... model_type=ModelType.TRANSFORMER
    nncf_transformer_float_decoder
                            ... with every node after the encoder in the
                            ignored scope (the RT-DETR recipe)
    nncf_accuracy_control_0.5, nncf_accuracy_control_1.0
                            nncf.quantize_with_accuracy_control from
                            TRANSFORMER, max drop 0.5 / 1.0 mAP, validated
                            by mmdet's CocoMetric on the val images (the
                            same images the table's mAP is measured on:
                            this favours NNCF); needs a checkpoint
    ort_quantize_static     ONNX Runtime's quantize_static (QDQ, MinMax,
                            its defaults)
    ort_quantize_static_u8_per_channel
                            ... uint8 activations, per-channel weights
                            (its fastest here)

Every baseline is calibrated on the same images as ours (the project's 100
train images; 4 noise images with --random-weights). Columns: mAP on the val
split (--eval), the convolutions and matrix products each runtime executes
in int8 (from what it compiled), latency at each --threads (every model
interleaved image by image, the order rotated, in --rounds rounds:
``mmdet_hawq.deploy.timing.time_models``), peak memory of a fresh process,
and the time to quantize. A variant that fails is a row with its error;
the run goes on. The targets of issue 30 are printed as ratios of this run.

Examples:
    python benchmarks/benchmark_runtimes.py configs/dino/dino_tiny_shapes.py \\
        checkpoints/dino_tiny_shapes.pth \\
        --run ours=results/option_matrix/rows/dino/w8a8_minmax \\
        --eval --out results/runtimes/dino_tiny_shapes.json
    python benchmarks/benchmark_runtimes.py \\
        configs/dino/dino_r50_uniform_8bit.py \\
        --random-weights --shape 800 1333 --images 2 --rounds 2 \\
        --threads 1 --out results/runtimes/dino_r50_800x1333.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Tuple  # noqa: E402

from mmdet_hawq.deploy.baselines import NNCF_VARIANTS  # noqa: E402
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_positive, check_work_dir, read_config, write_json)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402

FP32 = {'fp32_onnxruntime': ('onnxruntime', {}),
        'fp32_openvino_f32': ('openvino', {'precision': 'f32'}),
        'fp32_openvino': ('openvino', {'precision': None})}
OURS = {'ours_onnxruntime': ('onnxruntime', {}),
        'ours_openvino_f32': ('openvino', {'precision': 'f32'}),
        'ours_openvino': ('openvino', {'precision': None})}
ACCURACY_CONTROL = {'nncf_accuracy_control_0.5': 0.5,
                    'nncf_accuracy_control_1.0': 1.0}
ORT_STATIC = {'ort_quantize_static': False,
              'ort_quantize_static_u8_per_channel': True}
ROWS = list(FP32) + list(OURS) + list(NNCF_VARIANTS) + \
    list(ACCURACY_CONTROL) + list(ORT_STATIC)


def step(what: str) -> None:
    """One progress line, with the time."""
    print(f'[{time.strftime("%H:%M:%S")}] {what}', flush=True)


def error_text(err: Exception) -> str:
    text = ' '.join(str(err).split())
    if len(text) > 400:  # the start says where, the end what
        text = text[:150] + ' ... ' + text[-250:]
    return f'{type(err).__name__}: {text}'


def make_models(args: argparse.Namespace, cfg: Any, rows: List[str]
                ) -> Tuple[Dict[str, Dict[str, Any]], List[Dict[str, str]],
                           Tuple[int, int], List[Any], List[Any]]:
    """Export, quantize and collect every row's (file, runtime, options);
    the failures; the input size; the calibration and timed images."""
    from mmdet.registry import MODELS

    from mmdet_hawq.deploy import baselines, export_onnx
    from mmdet_hawq.engine.exported import (benchmark_inputs, coco_metrics,
                                          default_input_shape,
                                          load_for_export, ptq_run_files,
                                          quantize_w8a8, test_images,
                                          test_loader)
    from mmdet_hawq.quant.activations import load_ranges
    shape = tuple(args.shape) if args.shape else default_input_shape(cfg)
    model, calib, timed = benchmark_inputs(
        cfg, None if args.random_weights else args.checkpoint, shape,
        args.calib_images, args.images)
    work = args.work_dir
    fp32 = osp.join(work, 'fp32.onnx')
    step('exporting fp32')
    export_onnx(model, fp32, shape)
    models: Dict[str, Dict[str, Any]] = {}
    failed: List[Dict[str, str]] = []
    for name in FP32:
        if name in rows:
            runtime, options = FP32[name]
            models[name] = dict(file=fp32, runtime=runtime, options=options)
    if any(r in rows for r in OURS):
        ours = osp.join(work, 'ours.onnx')
        start = time.perf_counter()
        if args.run:
            folder = args.run
            files = ptq_run_files(folder, ('packed.pth', 'activations.json'))
            run_model, packed = load_for_export(cfg, files[0])
            step(f'exporting ours ({folder})')
            export_onnx(run_model, ours, shape, packed=packed,
                        activations=load_ranges(files[1]))
            made = dict(run=folder)
            with open(osp.join(folder, 'ptq_results.json')) as f:
                result = json.load(f)
            made['pytorch_mAP'] = next(
                v for k, v in result['quantized']['metrics'].items()
                if k.endswith('bbox_mAP'))
            summary = osp.join(folder, 'hawq', 'summary.json')
            if osp.isfile(summary):  # the hook's time, calibration included
                with open(summary) as f:
                    made['quantize_s'] = json.load(f).get('seconds')
        else:
            reference = copy.deepcopy(model)
            step(f'quantizing ours (W8A8) on {len(calib)} images')
            packed, ranges = quantize_w8a8(model, calib)
            reference.load_state_dict(model.state_dict())
            made = dict(quantize_s=time.perf_counter() - start)
            step('exporting ours')
            export_onnx(reference, ours, shape, packed=packed,
                        activations=ranges)
            model.load_state_dict(reference.state_dict())  # not used again
        for name in OURS:
            if name in rows:
                runtime, options = OURS[name]
                models[name] = dict(file=ours, runtime=runtime,
                                    options=options, **made)
    for name in NNCF_VARIANTS:
        if name not in rows:
            continue
        out = osp.join(work, f'{name}.xml')
        step(f'{name}: nncf.quantize on {len(calib)} images')
        try:
            made = baselines.nncf_quantize(fp32, out, calib, name)
        except Exception as err:  # noqa: BLE001 - a row of its own
            failed.append(dict(row=name, error=error_text(err)))
            continue
        models[name] = dict(file=out, runtime='openvino',
                            options={'precision': None}, **made)
    control = [r for r in ACCURACY_CONTROL if r in rows]
    if control and args.random_weights:
        failed += [dict(row=r, error='not run: needs a trained model (its '
                        'validation is mAP)') for r in control]
        control = []
    if control:
        loader = test_loader(cfg)
        head = MODELS.build(copy.deepcopy(cfg.model)).eval()
        items = list(test_images(loader, args.max_images))

        def validate(run: Any, part: Any) -> float:
            part = list(part)
            metrics = coco_metrics(cfg, head, run, part, len(part),
                                   loader.dataset)
            return next(v for k, v in metrics.items()
                        if k.endswith('bbox_mAP'))

    for name in control:
        out = osp.join(work, f'{name}.xml')
        step(f'{name}: nncf.quantize_with_accuracy_control')
        try:
            made = baselines.nncf_accuracy_control(
                fp32, out, calib, items, validate,
                ACCURACY_CONTROL[name] / 100)
        except Exception as err:  # noqa: BLE001 - a row of its own
            failed.append(dict(row=name, error=error_text(err)))
            continue
        models[name] = dict(file=out, runtime='openvino',
                            options={'precision': None}, **made)
    static = [r for r in ORT_STATIC if r in rows]
    if static:
        pre = osp.join(work, 'fp32_pre.onnx')
        baselines.ort_pre_process(fp32, pre)
    for name in static:
        out = osp.join(work, f'{name}.onnx')
        step(f'{name}: quantize_static on {len(calib)} images')
        try:
            u8 = ORT_STATIC[name]
            made = baselines.ort_quantize_static(
                pre, out, calib, per_channel=u8, u8_activations=u8,
                stride=baselines.calibration_stride(len(calib),
                                                    args.calib_stride))
        except Exception as err:  # noqa: BLE001 - a row of its own
            failed.append(dict(row=name, error=error_text(err)))
            continue
        models[name] = dict(file=out, runtime='onnxruntime', options={},
                            quantize_s=made['quantize_s'])
    return models, failed, shape, calib, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', nargs='?')
    parser.add_argument('checkpoint', nargs='?',
                        help='float checkpoint (not with --random-weights)')
    parser.add_argument('--report', metavar='JSON',
                        help='print the table of a finished run\'s --out '
                        'file, and nothing else')
    parser.add_argument('--random-weights', action='store_true',
                        help='time the config\'s model with its initial '
                        'weights on noise images (no mAP)')
    parser.add_argument('--run', metavar='WORK_DIR',
                        help='our model: a tools/ptq.py run with the '
                        'activations setting (default with --random-weights: '
                        'W8A8 made here)')
    parser.add_argument('--rows', nargs='+', choices=ROWS, metavar='ROW',
                        help=f'only these rows (default: all): {ROWS}')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'))
    parser.add_argument('--calib-images', type=int)
    parser.add_argument('--calib-stride', type=int, default=10,
                        help='quantize_static calibrates this many images '
                        'at a time (1 for R50 at 800x1333)')
    parser.add_argument('--images', type=int, default=20,
                        help='timed images per round (default 20)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, nargs='+', default=[1],
                        help='thread counts to time at (default 1)')
    parser.add_argument('--eval', action='store_true',
                        help='mAP of every row on the val split')
    parser.add_argument('--max-images', type=int,
                        help='evaluate (and validate NNCF\'s accuracy '
                        'control) on the first N val images only')
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument('--work-dir')
    parser.add_argument('--out', help='JSON file for the results')
    args = parser.parse_args()
    if args.report:
        if not osp.isfile(args.report):
            raise HawqUserError(f'--report {args.report!r} does not exist: '
                                'pass the --out file of a finished run')
        with open(args.report) as f:
            record = json.load(f)
        print(table(record))
        for line in record['targets']:
            print(line)
        return 0
    if not args.config:
        raise HawqUserError('pass a config (or --report JSON)')
    check_positive(args, ('calib_images', 'images', 'rounds', 'max_images'))
    if min(args.threads) < 1:
        raise HawqUserError('--threads takes positive integers')
    if args.random_weights == bool(args.checkpoint):
        raise HawqUserError('pass a float checkpoint, or --random-weights '
                            '(timing only), not both or neither')
    if args.random_weights and (args.eval or args.run):
        raise HawqUserError('--eval and --run need a checkpoint: random '
                            'weights have no mAP')
    if args.checkpoint and not args.run and any(
            r in OURS for r in (args.rows or ROWS)):
        raise HawqUserError('pass --run WORK_DIR of a tools/ptq.py run with '
                            'activations (ours), or leave the ours_* rows '
                            'out of --rows')
    from mmdet_hawq.deploy.runtimes import runtime_missing
    missing = runtime_missing('openvino')
    if missing:
        raise HawqUserError(f'this benchmark needs OpenVINO and NNCF: '
                            f'{missing}')
    cfg = read_config(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    args.work_dir = args.work_dir or osp.join('work_dirs',
                                              'benchmark_runtimes', name)
    check_work_dir(args.work_dir)
    if args.out:
        check_work_dir(osp.dirname(osp.abspath(args.out)))
    logging.getLogger().setLevel(logging.ERROR)
    rows = args.rows or ROWS
    models, failed, shape, calib, timed = make_models(args, cfg, rows)

    from mmdet_hawq.deploy.runtimes import make_session
    from mmdet_hawq.deploy.timing import measure_memory, time_models
    from mmdet_hawq.engine.exported import evaluate_map
    for key, row in list(models.items()):
        step(f'{key}: kernels' + (', mAP' if args.eval else '') +
             ('' if args.no_memory else ', peak memory'))
        try:
            session = make_session(row['file'], row['runtime'],
                                   **row['options'])
            row['kernel_precisions'] = session.kernel_precisions()
            del session
            if args.eval:
                row.update(evaluate_map(cfg, row['file'], row['runtime'],
                                        max_images=args.max_images,
                                        **row['options']))
                print(f'{key}: mAP {row["mAP"]:.3f}', flush=True)
            if not args.no_memory:
                row['memory'] = measure_memory(row['file'], row['runtime'],
                                               options=row['options'])
        except Exception as err:  # noqa: BLE001 - a row of its own
            failed.append(dict(row=key, error=error_text(err)))
            del models[key]
    latency = {}
    for threads in args.threads:
        step(f'timing {len(models)} models on {len(timed)} images, '
             f'{args.rounds} rounds, {threads} thread(s)')
        latency[threads] = time_models(
            {k: (r['file'], r['runtime'], r['options'])
             for k, r in models.items()}, timed, threads, args.rounds,
            args.warmup)
        for key, row in models.items():
            row.setdefault('latency', {})[str(threads)] = latency[threads][key]
    record = dict(config=args.config, checkpoint=args.checkpoint,
                  random_weights=args.random_weights, input_shape=list(shape),
                  calibration_images=len(calib), timed_images=len(timed),
                  rounds=args.rounds, threads=args.threads,
                  rows=models, failed=failed, targets=targets(models, args),
                  command='python benchmarks/benchmark_runtimes.py ' +
                  ' '.join(sys.argv[1:]))
    print(table(record))
    for line in record['targets']:
        print(line)
    if args.out:
        write_json(args.out, record)
    return 0


def _median(row: Dict[str, Any], threads: int) -> float:
    return row['latency'][str(threads)]['median_ms']


def targets(models: Dict[str, Dict[str, Any]],
            args: argparse.Namespace) -> List[str]:
    """Issue 30's targets as ratios of this run."""
    lines = []
    ours = {k: r for k, r in models.items() if k.startswith('ours_')}
    nncf = {k: r for k, r in models.items() if k.startswith('nncf_')}
    fp32 = {k: r for k, r in models.items() if k.startswith('fp32_')}
    for threads in args.threads:
        for others, name, target in (
                (nncf, 'NNCF\'s fastest', 'target >= 1.00'),
                (fp32, 'the fastest fp32', 'DINO-R50 target >= 1.50')):
            if not (ours and others):
                continue
            best = min(ours, key=lambda k: _median(ours[k], threads))
            peer = min(others, key=lambda k: _median(others[k], threads))
            ratio = _median(others[peer], threads) / _median(ours[best],
                                                              threads)
            lines.append(f'{threads} thread(s): ours fastest ({best}) is '
                         f'{ratio:.2f}x {name} ({peer}); {target}')
    if args.eval and ours and nncf:
        best = max(ours, key=lambda k: ours[k]['mAP'])
        peer = max(nncf, key=lambda k: nncf[k]['mAP'])
        lines.append(f'mAP: ours best {ours[best]["mAP"]:.3f} ({best}), '
                     f'NNCF best {nncf[peer]["mAP"]:.3f} ({peer}); target: '
                     'ours >= NNCF')
    return lines


def table(record: Dict[str, Any]) -> str:
    """Markdown: one row per model, latency as a ratio to the fastest fp32
    row of the same thread count."""
    threads = record['threads']
    head = ['row', 'runtime', 'mAP', 'int8 conv / matmul (float)'] + \
        [f'{t} thread(s): ms (spread), x fastest fp32' for t in threads] + \
        ['peak MiB', 'quantize s']
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    rows = record['rows']
    fp32 = [r for k, r in rows.items() if k.startswith('fp32_')]
    for key, r in rows.items():
        k = r.get('kernel_precisions', {})
        floats = sum(v for p, v in k.items() if not p.endswith('/int8'))
        cells = [key, r['runtime'] + (' f32' if r['options'].get(
            'precision') == 'f32' else ''),
            '-' if r.get('mAP') is None else f'{r["mAP"]:.3f}',
            f'{k.get("Convolution/int8", 0)} / {k.get("MatMul/int8", 0)} '
            f'({floats})']
        for t in threads:
            lat = r['latency'][str(t)]
            base = min((_median(f, t) for f in fp32), default=None)
            ratio = f', {base / lat["median_ms"]:.2f}x' if base else ''
            cells.append(f'{lat["median_ms"]:.1f} ({lat["spread_ms"]:.1f})'
                         f'{ratio}')
        memory = r.get('memory', {}).get('peak_mib')
        cells.append('-' if memory is None else f'{memory:.0f}')
        q = r.get('quantize_s')
        cells.append('-' if q is None else f'{q:.0f}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    for fail in record['failed']:  # a row of its own, with its error
        error = fail['error'].replace('|', '/')
        lines.append(f'| {fail["row"]} | failed: {error[:160]}'
                     + ' | -' * (len(head) - 2) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    run_cli(main)

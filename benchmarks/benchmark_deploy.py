"""Benchmark what was quantized, deployed: fp32 vs INT4/INT8 ONNX under ONNX
Runtime, and PyTorch with fp32 or packed weights, side by side in one run.

The packed checkpoint's model is exported twice (fp32 weights, and integer
weights with DequantizeLinear); then every variant runs in a fresh process of
its own, which reports its resident memory (VmRSS from /proc) before and
after loading the model (after glibc's malloc_trim, so memory freed while
loading, e.g. fp32 weights replaced by packed ones, is not counted) and
after the first image, and its per-image latency on the same test images
(batch 1, the network only: preprocessing in the graph, no
post-processing): wall time, and the CPU time of the one inference thread,
which other processes on a busy machine do not inflate. Variants:

    onnx_fp32          ONNX Runtime, fp32 ONNX
    onnx_int           ONNX Runtime, INT4/INT8 ONNX (default session)
    onnx_int_folded    the same with session.disable_quant_qdq=1 (the
                       weights are dequantized once, at session start)
    torch_fp32         PyTorch, the fake-quantized model (fp32 weights)
    torch_packed       PyTorch, weights kept packed (load_packed)
    onnx_w8a8          ONNX Runtime, integer weights and 8-bit activations
                       (QuantizeLinear/DequantizeLinear pairs from the run's
                       activations.json, --activations): ONNX Runtime's
                       integer kernels

Every row has ``speedup_vs_fp32``: the fp32 ONNX model's median CPU time
over the variant's.

Also reported: on how many of the images PyTorch with packed weights gives
detections bit-identical to the fake-quantized model (mmdet's predict), and
what ONNX Runtime's graph optimisation does to the DequantizeLinear nodes
(read back from the optimised graph it writes).

Example:
    python benchmarks/benchmark_deploy.py configs/detr/detr_tiny_shapes.py \
        results/table1/rows/4-bit_uniform_none/packed.pth --images 50 \
        --out results/benchmark_deploy_detr.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import os.path as osp  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

from mmdet_hawq.deploy.timing import (  # noqa: E402
    MIB, rss_bytes, run_worker, trim_heap)
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_work_dir, read_config, write_json)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402

VARIANTS = ('onnx_fp32', 'onnx_int', 'onnx_int_folded', 'torch_fp32',
            'torch_packed', 'onnx_w8a8')
ONNX_FILES = dict(onnx_fp32='fp32.onnx', onnx_w8a8='w8a8.onnx')


def worker(args: argparse.Namespace) -> int:
    """One variant in this (fresh) process; prints one JSON line."""
    import onnxruntime  # noqa: F401 - every variant pays the same imports
    import torch
    from mmdet.utils import register_all_modules

    from mmdet_hawq.deploy import DetectorOnnxWrapper, module_weight_bytes
    from mmdet_hawq.deploy.onnx_runtime import OnnxDetector
    register_all_modules()
    torch.set_num_threads(args.threads)
    images = np.load(osp.join(args.work_dir, 'images.npy'))
    shape = tuple(images.shape[2:])
    variant = args.worker
    record: Dict[str, Any] = dict(variant=variant)
    before = rss_bytes()
    start = time.perf_counter()
    if variant.startswith('onnx'):
        name = ONNX_FILES.get(variant, 'int.onnx')
        model = OnnxDetector(osp.join(args.work_dir, name), args.threads,
                             fold_dequantize=variant == 'onnx_int_folded')

        def run(x: np.ndarray) -> Any:
            return model(x[None])
    else:
        cfg = read_config(args.config)
        if variant == 'torch_packed':
            from mmdet_hawq.engine.exported import build_packed_detector
            detector = build_packed_detector(cfg, args.checkpoint)
        else:
            from mmdet_hawq.engine.exported import load_for_export
            detector = load_for_export(cfg, args.checkpoint)[0]
        record['weight_bytes'] = module_weight_bytes(detector)
        net = DetectorOnnxWrapper(detector, shape)

        def run(x: np.ndarray) -> Any:
            with torch.no_grad():
                return net(torch.from_numpy(x[None]))
    record['load_s'] = time.perf_counter() - start
    trim_heap()
    loaded = rss_bytes()
    run(images[0])
    first = rss_bytes()
    for i in range(args.warmup):
        run(images[i % len(images)])
    times, cpu = [], []
    for image in images:
        start, start_cpu = time.perf_counter(), time.thread_time()
        run(image)
        times.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    end = rss_bytes()
    times_ms = sorted(t * 1e3 for t in times)
    cpu_ms = sorted(t * 1e3 for t in cpu)
    record.update(
        rss_before_load=before['VmRSS'], rss_after_load=loaded['VmRSS'],
        rss_after_first_image=first['VmRSS'], rss_end=end['VmRSS'],
        rss_peak=end['VmHWM'],
        latency_ms=dict(
            median=statistics.median(times_ms), mean=statistics.mean(times_ms),
            p90=times_ms[min(len(times_ms) - 1, int(0.9 * len(times_ms)))],
            min=times_ms[0]),
        cpu_ms=dict(median=statistics.median(cpu_ms), min=cpu_ms[0],
                    mean=statistics.mean(cpu_ms)),
        images=len(times_ms))
    print(json.dumps(record))
    return 0


def spawn(args: argparse.Namespace, variant: str) -> Dict[str, Any]:
    return run_worker(
        [sys.executable, osp.abspath(__file__), args.config, args.checkpoint,
         '--worker', variant, '--work-dir', args.work_dir, '--threads',
         str(args.threads), '--warmup', str(args.warmup)],
        args.threads, f'the {variant} worker')


def save_images(cfg: Any, work_dir: str, count: int) -> List[Any]:
    """Save the first ``count`` test images for the workers; returns them
    (uint8 image, data sample)."""
    from mmdet_hawq.engine.exported import test_images, test_loader
    pairs = list(test_images(test_loader(cfg), count))
    shapes = {tuple(img.shape) for img, _ in pairs}
    if len(shapes) != 1:
        raise HawqUserError(
            f'the first {count} test images have {len(shapes)} sizes '
            f'{sorted(shapes)}: the exported model takes one size')
    np.save(osp.join(work_dir, 'images.npy'),
            np.stack([img.cpu().numpy().astype(np.float32)
                      for img, _ in pairs]))
    return pairs


def identical_detections(fake: Any, packed: Any, pairs: List[Any]) -> int:
    """On how many images mmdet's predict gives bit-identical detections
    (scores, labels, boxes) with fp32 and with packed weights."""
    import copy

    import torch
    same = 0
    for image, sample in pairs:
        out = []
        for model in (fake, packed):
            with torch.no_grad():
                data = model.data_preprocessor(dict(
                    inputs=[image], data_samples=[copy.deepcopy(sample)]),
                    False)
                out.append(model.predict(data['inputs'],
                                         data['data_samples'])[0])
        a, b = out[0].pred_instances, out[1].pred_instances
        same += all(torch.equal(a[k], b[k])
                    for k in ('scores', 'labels', 'bboxes'))
    return same


def table(rows: List[Dict[str, Any]], sizes: Dict[str, Optional[int]]
          ) -> str:
    head = ('| variant | file MiB | weights in memory MiB | RSS load +MiB | '
            'RSS after 1st image MiB | CPU ms median | wall ms median | '
            'wall ms min | speed-up vs fp32 ONNX |')
    lines = [head, '|' + '---|' * 9]
    for r in rows:
        size = sizes.get(r['variant'])
        weights = r.get('weight_bytes', {}).get('total')
        speedup = f'{r["speedup_vs_fp32"]:.2f}x' if 'speedup_vs_fp32' in r \
            else '-'
        lines.append(
            f'| {r["variant"]} | '
            f'{"-" if size is None else f"{size / MIB:.3f}"} | '
            f'{"-" if weights is None else f"{weights / MIB:.3f}"} | '
            f'{(r["rss_after_load"] - r["rss_before_load"]) / MIB:.1f} | '
            f'{r["rss_after_first_image"] / MIB:.1f} | '
            f'{r["cpu_ms"]["median"]:.2f} | '
            f'{r["latency_ms"]["median"]:.2f} | '
            f'{r["latency_ms"]["min"]:.2f} | {speedup} |')
    return '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='packed low-bit .pth')
    parser.add_argument('--images', type=int, default=50,
                        help='timed test images per variant (default 50)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1,
                        help='intra-op threads of every variant (default 1)')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS,
                        help='default: all (onnx_w8a8 with --activations)')
    parser.add_argument('--activations', metavar='JSON',
                        help="the activations.json of the checkpoint's run "
                        '(its 8-bit activation ranges), for onnx_w8a8')
    parser.add_argument('--work-dir', default='work_dirs/benchmark_deploy')
    parser.add_argument('--out', help='JSON file for the results')
    parser.add_argument('--worker', choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.images < 1 or args.threads < 1 or args.warmup < 0:
        raise HawqUserError('--images and --threads take positive integers, '
                            '--warmup a non-negative one')
    if args.worker:
        return worker(args)
    if args.variants is None:
        args.variants = [v for v in VARIANTS
                         if v != 'onnx_w8a8' or args.activations]
    if 'onnx_w8a8' in args.variants and not args.activations:
        raise HawqUserError(
            'variant onnx_w8a8 needs the activation ranges: pass '
            '--activations <work_dir>/hawq/activations.json of a run with '
            "the 'activations' setting")
    cfg = read_config(args.config)
    check_work_dir(args.work_dir)

    from mmdet_hawq.deploy import export_onnx
    from mmdet_hawq.deploy.runtimes.onnxruntime_session import \
        dequantize_behaviour
    from mmdet_hawq.engine.exported import load_for_export
    model, packed = load_for_export(cfg, args.checkpoint)
    if packed is None:
        raise HawqUserError(
            f'{args.checkpoint!r} is not a packed low-bit checkpoint: pass '
            'the packed.pth that DistillSensitivityHook or tools/ptq.py '
            'wrote')
    pairs = save_images(cfg, args.work_dir, args.images)
    shape = list(pairs[0][0].shape[1:])
    fp32 = export_onnx(model, osp.join(args.work_dir, 'fp32.onnx'), shape)
    low = export_onnx(model, osp.join(args.work_dir, 'int.onnx'), shape,
                      packed=packed)
    sizes = dict(onnx_fp32=fp32['bytes'], onnx_int=low['bytes'],
                 onnx_int_folded=low['bytes'],
                 torch_packed=osp.getsize(args.checkpoint))
    if 'onnx_w8a8' in args.variants:
        from mmdet_hawq.quant.activations import load_ranges
        sizes['onnx_w8a8'] = export_onnx(
            model, osp.join(args.work_dir, 'w8a8.onnx'), shape,
            packed=packed, activations=load_ranges(args.activations))['bytes']
    from mmdet_hawq.engine.exported import build_packed_detector
    identical = identical_detections(
        model, build_packed_detector(cfg, args.checkpoint), pairs)
    del model, pairs
    rows = []
    for variant in args.variants:
        rows.append(spawn(args, variant))
        print(f'{variant}: median {rows[-1]["cpu_ms"]["median"]:.2f} ms CPU',
              flush=True)
    base = [r for r in rows if r['variant'] == 'onnx_fp32']
    for r in rows:
        if base:
            r['speedup_vs_fp32'] = base[0]['cpu_ms']['median'] / \
                r['cpu_ms']['median']
    behaviour = dequantize_behaviour(osp.join(args.work_dir, 'int.onnx'))
    print(f'\n{args.checkpoint}: packed checkpoint '
          f'{osp.getsize(args.checkpoint) / MIB:.3f} MiB; fp32 ONNX '
          f'{fp32["bytes"] / MIB:.3f} MiB; INT4/INT8 ONNX '
          f'{low["bytes"] / MIB:.3f} MiB ({low["dequantize_nodes"]} '
          'DequantizeLinear)')
    print(f'PyTorch with packed weights vs fp32 (fake-quantized) weights: '
          f'bit-identical detections on {identical} of {args.images} '
          'images (mmdet predict)')
    print(f'{args.images} images of {shape[0]}x{shape[1]}, batch 1, '
          f'{args.threads} thread(s), one fresh process per variant\n')
    print(table(rows, sizes))
    print('\nONNX Runtime graph optimisation and DequantizeLinear '
          '(optimised graph read back):')
    for b in behaviour:
        fold = str(b['fold_dequantize'])
        print(f'  level {b["level"]:<8} fold_dequantize={fold:<5} '
              f'DequantizeLinear nodes {b["dequantize_nodes"]:>3}, '
              f'initializers {b["initializers"]}')
    if args.out:
        write_json(args.out, dict(
            config=args.config, checkpoint=args.checkpoint,
            images=args.images, threads=args.threads, input_shape=shape,
            sizes=sizes, packed_bit_identical_images=identical,
            checkpoint_bytes=osp.getsize(args.checkpoint), results=rows,
            dequantize_behaviour=behaviour,
            command='python benchmarks/benchmark_deploy.py ' +
            ' '.join(sys.argv[1:])))
    return 0


if __name__ == '__main__':
    run_cli(main)

"""Export a detector to ONNX, its quantized weights as INT4/INT8 integers.

The network maps one image as the test pipeline loads it (float32
(1, 3, H, W), 0-255) to every decoder layer's class scores and boxes; each
weight of a packed checkpoint is an integer initializer (INT4 up to 4 bits,
INT8 for 5-8 bits) with its scale and a DequantizeLinear (opset 21); a float
checkpoint, or --float-weights, gives an fp32 model. The export is checked
on one random image against the PyTorch model under ONNX Runtime.

Examples:
    python tools/export_onnx.py configs/detr/detr_tiny_shapes.py \
        results/table1/rows/4-bit_uniform_none/packed.pth \
        work_dirs/onnx/detr_uniform4.onnx
    python tools/export_onnx.py configs/detr/detr_tiny_shapes.py \
        checkpoints/detr_tiny_shapes.pth work_dirs/onnx/detr_fp32.onnx
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import os  # noqa: E402
import os.path as osp  # noqa: E402
from typing import Any, Dict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmdet_hawq.engine.cli import read_config, write_json  # noqa: E402
from mmdet_hawq.engine.exported import (default_input_shape,  # noqa: E402
                                      load_for_export)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402
from mmdet_hawq.quant.activations import (load_ranges,  # noqa: E402
                                          quantized_activations, sites_of)

MIB = 2**20


def check_out(path: str) -> str:
    """The output file: ``.onnx``, in a folder that can be written."""
    if not path.endswith('.onnx'):
        raise HawqUserError(
            f'output {path!r} does not end in .onnx: pass a path like '
            'work_dirs/onnx/model.onnx')
    folder = osp.dirname(osp.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise HawqUserError(
            f'folder {folder!r} for {path!r} cannot be made '
            f'({err.strerror or err}): pass a writable output path') from None
    if not os.access(folder, os.W_OK):
        raise HawqUserError(
            f'folder {folder!r} cannot be written: pass a writable output '
            'path')
    return path


def verify(model: torch.nn.Module, onnx_file: str, shape: tuple,
           last_layer_only: bool) -> Dict[str, float]:
    """Max abs differences, ONNX Runtime vs PyTorch, on a random image."""
    from mmdet_hawq.deploy import DetectorOnnxWrapper
    from mmdet_hawq.deploy.onnx_runtime import OnnxDetector
    gen = torch.Generator(device='cpu').manual_seed(0)
    image = torch.rand(1, 3, *shape, generator=gen) * 255
    with torch.no_grad():
        ref = DetectorOnnxWrapper(model, shape, last_layer_only)(image)
    out = OnnxDetector(onnx_file)(image.cpu().numpy())
    return dict(scores=float(np.abs(out[0] - ref[0].cpu().numpy()).max()),
                boxes=float(np.abs(out[1] - ref[1].cpu().numpy()).max()))


def describe(report: Dict[str, Any]) -> str:
    parts = []
    for kind, entry in sorted(report['initializers'].items()):
        parts.append(f'{kind} {entry["count"]} tensors '
                     f'{entry["bytes"] / MIB:.3f} MiB')
    return ', '.join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint',
                        help='float checkpoint or packed low-bit .pth')
    parser.add_argument('out', help='the .onnx file to write')
    parser.add_argument('--shape', type=int, nargs='+', metavar='N',
                        help='input image H W (default: the test '
                        'pipeline\'s fixed size)')
    parser.add_argument('--last-layer-only', action='store_true',
                        help='outputs of the last decoder layer only')
    parser.add_argument('--float-weights', action='store_true',
                        help='store the (dequantized) weights as fp32: '
                        'the same network without integer weights')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the ONNX Runtime check on a random image')
    parser.add_argument('--opset', type=int, default=None,
                        help='opset of the written model (default and '
                        'minimum with integer weights: 21; a float model: '
                        '16 to 21)')
    parser.add_argument('--activations', metavar='JSON',
                        help="the activations.json of a run with the "
                        "'activations' setting: 8-bit activations as "
                        'QuantizeLinear/DequantizeLinear pairs')
    parser.add_argument('--int4-matmul', action='store_true',
                        help="weights of at most 4 bits in linear layers as "
                        "ONNX Runtime's MatMulNBits (packed 4-bit codes)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    cfg = read_config(args.config, args.cfg_options)
    shape = default_input_shape(cfg, args.shape)
    out = check_out(args.out)
    model, packed = load_for_export(cfg, args.checkpoint)
    ranges = load_ranges(args.activations) if args.activations else None
    if packed is None:
        print(f'{args.checkpoint} is not quantized (a float checkpoint, no '
              'packed weights): exporting it with fp32 weights; pass the '
              "hook's packed.pth for integer weights")

    from mmdet_hawq.deploy import (ONNX_OPSET, check_opset, export_onnx,
                                   stores_int4)
    integer = packed is not None and not args.float_weights
    opset = ONNX_OPSET if args.opset is None else args.opset
    check_opset(opset, stores_int4(packed if integer else None, ranges))
    report = export_onnx(model, out, shape,
                         packed=packed if integer else None,
                         last_layer_only=args.last_layer_only, opset=opset,
                         activations=ranges,
                         int4_matmul=args.int4_matmul and integer)
    bits = report['weight_bits']
    counts = {'INT4': sum(b <= 4 for b in bits.values()),
              'INT8': sum(b > 4 for b in bits.values())}
    record = dict(config=args.config, checkpoint=args.checkpoint,
                  out=out, input_shape=list(shape), opset=report['opset'],
                  onnx_bytes=report['bytes'],
                  checkpoint_bytes=osp.getsize(args.checkpoint),
                  initializers=report['initializers'],
                  quantized_weights=counts,
                  dequantize_nodes=report['dequantize_nodes'],
                  **{k: report[k] for k in ('folded_batch_norms',
                                            'int32_biases', 'matmul_nbits')
                     if k in report})
    print(f'{out}: {report["bytes"] / MIB:.3f} MiB, opset '
          f'{report["opset"]}, input (1, 3, {shape[0]}, {shape[1]})')
    print(f'initializers: {describe(report)}')
    print(f'quantized weights: {counts["INT4"]} INT4 + {counts["INT8"]} '
          f'INT8, {report["dequantize_nodes"]} DequantizeLinear; checkpoint '
          f'{args.checkpoint}: {record["checkpoint_bytes"] / MIB:.3f} MiB')
    if report['unused_weights']:
        print(f'not in the inference graph (training only): '
              f'{", ".join(report["unused_weights"])}')
        record['unused_weights'] = report['unused_weights']
    if report['folded_weights']:
        print(f'computed at export (they do not depend on the image): '
              f'{", ".join(report["folded_weights"])}')
        record['folded_weights'] = report['folded_weights']
    if not args.no_verify:
        with quantized_activations(sites_of(model, ranges or {}),
                                   ranges or {}):
            diff = verify(model, out, shape, args.last_layer_only)
        record['max_abs_diff_random_image'] = diff
        print('ONNX Runtime vs PyTorch on a random image: max abs diff '
              f'scores {diff["scores"]:.2e}, boxes {diff["boxes"]:.2e}')
    write_json(out[:-len('.onnx')] + '.json', record)
    return 0


if __name__ == '__main__':
    run_cli(main)

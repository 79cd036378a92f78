"""The quantizers this project is measured against, on the same fp32
export and calibration images: ONNX Runtime's ``quantize_static`` and
NNCF's ``quantize`` / ``quantize_with_accuracy_control`` (OpenVINO).

Every function takes the calibration images as the exported graph takes
them: float32 (1, 3, H, W), 0-255.
"""
import os
import os.path as osp
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = [
    'COMPUTE_OPS', 'ENCODER_SIDE', 'NNCF_VARIANTS', 'SAMPLING',
    'calibration_stride', 'excluded_nodes', 'graph_summary',
    'nncf_accuracy_control', 'nncf_quantize', 'ort_pre_process',
    'ort_quantize_static'
]

#: Ops with integer kernels (``quantize_static``'s ``compute_only``).
COMPUTE_OPS = ['Conv', 'MatMul', 'Gemm']
#: Node-name prefixes of the backbone, neck and encoder in the export.
ENCODER_SIDE = ('/backbone/', '/neck/', '/encoder/')
#: Node names of the deformable attention's sampling projections.
SAMPLING = ('/sampling_offsets/', '/attention_weights/')
#: NNCF settings: name → (model type, float decoder).
NNCF_VARIANTS = {
    'nncf_defaults': (None, False),
    'nncf_transformer': ('TRANSFORMER', False),
    'nncf_transformer_float_decoder': ('TRANSFORMER', True),
}


def excluded_nodes(names: Iterable[str], variant: str) -> List[str]:
    """The node names a variant keeps float: ``float_decoder`` everything
    after the encoder (the decoder, the heads, the two-stage query
    selection), ``float_sampling`` the deformable attention's sampling
    projections; none otherwise."""
    names = list(names)
    if variant == 'float_decoder':
        return [n for n in names if n and not n.startswith(ENCODER_SIDE)]
    if variant == 'float_sampling':
        return [n for n in names if any(s in n for s in SAMPLING)]
    return []


def graph_summary(path: str) -> Dict[str, Any]:
    """Q/DQ counts, and the MatMul/Conv/Gemm nodes fed by a
    DequantizeLinear on every input (``int8_compute_nodes``)."""
    import collections

    import onnx
    model = onnx.load(path, load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    int8 = sum(all(producer.get(i) == 'DequantizeLinear'
                   for i in n.input[:2]) for n in compute)
    return dict(quantize_linear=ops['QuantizeLinear'],
                dequantize_linear=ops['DequantizeLinear'],
                compute_nodes=len(compute), int8_compute_nodes=int8,
                bytes=osp.getsize(path))


def _reader(images: Sequence[np.ndarray], input_name: str) -> Any:
    """A fresh ``CalibrationDataReader`` over ``images``."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):

        def __init__(self) -> None:
            self.feed = iter(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.feed = iter(images[start_index:end_index])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            image = next(self.feed, None)
            return None if image is None else {input_name: image}

        def __len__(self) -> int:
            return len(images)

    return Reader()


def ort_pre_process(fp32: str, out: str) -> str:
    """``quant_pre_process`` of ``fp32`` into ``out``; returns what ran
    (without its symbolic shape inference where that fails)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32, out = osp.abspath(fp32), osp.abspath(out)
    here = os.getcwd()
    try:
        # where its symbolic shape inference fails, ONNX Runtime saves a
        # debug model (sym_shape_infer_temp.onnx and its weights) in the
        # working directory: a scratch one here
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                quant_pre_process(fp32, out)
            finally:
                os.chdir(here)
        return 'quant_pre_process'
    except Exception as err:  # noqa: BLE001 - retried, and recorded
        first = (str(err).strip().splitlines() or [''])[0]
        quant_pre_process(fp32, out, skip_symbolic_shape=True)
        return ('quant_pre_process(skip_symbolic_shape=True) (symbolic '
                f'shape inference failed: {type(err).__name__}: {first})')


def calibration_stride(count: int, stride: int) -> Optional[int]:
    """The largest divisor of ``count`` up to ``stride`` (None for 0):
    ``quantize_static`` calibrates in chunks of this many images (its
    ``CalibStridedMinMax``; histograms are merged chunk by chunk), so that
    the histogram methods do not hold every intermediate output of every
    image at once."""
    if not stride or stride >= count:
        return None
    return max(d for d in range(1, stride + 1) if count % d == 0)


def ort_quantize_static(pre: str, out: str, images: Sequence[np.ndarray],
                        method: str = 'MinMax', variant: str = 'all',
                        per_channel: bool = False,
                        stride: Optional[int] = None,
                        u8_activations: bool = False) -> Dict[str, Any]:
    """ONNX Runtime's ``quantize_static`` (QDQ) of a pre-processed fp32
    model (:func:`ort_pre_process`) into ``out``.

    Args:
        pre (str): The pre-processed fp32 model.
        out (str): The quantized model to write.
        images (Sequence[np.ndarray]): Calibration images.
        method (str): ``'MinMax'``, ``'Entropy'`` or ``'Percentile'``.
        variant (str): ``'all'`` (its defaults), ``'float_decoder'``,
            ``'float_sampling'`` (:func:`excluded_nodes`) or
            ``'compute_only'`` (:data:`COMPUTE_OPS`).
        per_channel (bool): Per-channel weight scales.
        stride (int, optional): :func:`calibration_stride`.
        u8_activations (bool): QUInt8 activations instead of its default
            QInt8.

    Returns:
        dict: ``quantize_s``, ``excluded_nodes`` and
        :func:`graph_summary`'s counts.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    model = onnx.load(pre)
    exclude = excluded_nodes((n.name for n in model.graph.node), variant)
    input_name = model.graph.input[0].name
    del model
    extra = {'CalibStridedMinMax': stride} if stride else {}
    start = time.perf_counter()
    quantize_static(pre, out, _reader(images, input_name),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    calibrate_method=getattr(CalibrationMethod, method),
                    nodes_to_exclude=exclude, extra_options=extra,
                    activation_type=QuantType.QUInt8 if u8_activations
                    else QuantType.QInt8,
                    op_types_to_quantize=COMPUTE_OPS
                    if variant == 'compute_only' else None)
    return dict(quantize_s=time.perf_counter() - start,
                excluded_nodes=len(exclude), **graph_summary(out))


def _nncf_settings(model: Any, variant: str) -> Dict[str, Any]:
    import nncf
    model_type, float_decoder = NNCF_VARIANTS[variant]
    kwargs: Dict[str, Any] = {}
    if model_type:
        kwargs['model_type'] = getattr(nncf.ModelType, model_type)
    if float_decoder:
        names = excluded_nodes((op.get_friendly_name()
                                for op in model.get_ops()
                                if op.get_type_name() not in (
                                    'Parameter', 'Result', 'Constant')),
                               'float_decoder')
        kwargs['ignored_scope'] = nncf.IgnoredScope(names=names,
                                                    validate=False)
    return kwargs


def nncf_quantize(fp32: str, out: str, images: Sequence[np.ndarray],
                  variant: str = 'nncf_defaults') -> Dict[str, Any]:
    """NNCF's post-training quantization of the fp32 export (OpenVINO
    backend) on ``images``, saved as OpenVINO IR ``out`` (``.xml``).

    Args:
        fp32 (str): The fp32 ``.onnx`` export.
        out (str): The ``.xml`` to write.
        images (Sequence[np.ndarray]): Calibration images (all are used:
            ``subset_size``).
        variant (str): One of :data:`NNCF_VARIANTS`: NNCF's defaults,
            ``ModelType.TRANSFORMER``, or that with every node after the
            encoder in the ignored scope (the recipe users apply to
            RT-DETR).

    Returns:
        dict: ``quantize_s``.
    """
    import nncf
    import openvino as ov
    model = ov.Core().read_model(fp32)
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(list(images)),
                              subset_size=len(images),
                              **_nncf_settings(model, variant))
    seconds = time.perf_counter() - start
    ov.save_model(quantized, out, compress_to_fp16=False)
    return dict(quantize_s=seconds)


def nncf_accuracy_control(fp32: str, out: str,
                          images: Sequence[np.ndarray],
                          validation: Sequence[Any],
                          validate: Callable[[Callable[[np.ndarray], Any],
                                              Iterable[Any]], float],
                          max_drop: float,
                          variant: str = 'nncf_transformer'
                          ) -> Dict[str, Any]:
    """NNCF's ``quantize_with_accuracy_control``: quantize, then return
    layers to float, most damaging first, until the metric is within
    ``max_drop`` (absolute) of the fp32 model's.

    Args:
        fp32 (str): The fp32 ``.onnx`` export.
        out (str): The ``.xml`` to write.
        images (Sequence[np.ndarray]): Calibration images.
        validation (Sequence): The validation items ``validate`` reads.
        validate (Callable): ``(run, items) → metric``, where
            ``run(image) → (scores, boxes)`` runs the model NNCF is
            evaluating on one (1, 3, H, W) float32 image.
        max_drop (float): The largest drop allowed, in the metric's units.
        variant (str): The :data:`NNCF_VARIANTS` settings it starts from.
            Defaults to ``'nncf_transformer'``.

    Returns:
        dict: ``quantize_s`` (the whole search, evaluations included).
    """
    import nncf
    import openvino as ov
    model = ov.Core().read_model(fp32)

    def validation_fn(compiled: Any, items: Iterable[Any]) -> Any:
        def run(image: np.ndarray) -> Any:
            result = compiled(image)
            return tuple(np.asarray(result[o]) for o in compiled.outputs)
        return validate(run, items), None

    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(list(images)), nncf.Dataset(list(validation)),
        validation_fn, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(images), **_nncf_settings(model, variant))
    seconds = time.perf_counter() - start
    ov.save_model(quantized, out, compress_to_fp16=False)
    return dict(quantize_s=seconds)

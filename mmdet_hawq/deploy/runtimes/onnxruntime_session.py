"""ONNX Runtime (CPU) sessions, and what its graph optimisations do with
``DequantizeLinear`` nodes."""
import collections
import os.path as osp
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from .base import Session, check_model_file, count_kernels, load_error

__all__ = ['FOLD_DEQUANTIZE_KEY', 'ORT_KERNELS', 'OrtSession',
           'dequantize_behaviour', 'ort_session']

#: ONNX Runtime session option that lets constant folding dequantize
#: constant ``DequantizeLinear`` inputs at session start (and turns off its
#: QDQ fusions); by default it is ``'0'`` and they run at every inference.
FOLD_DEQUANTIZE_KEY = 'session.disable_quant_qdq'

#: ONNX Runtime's CPU kernels of an optimised graph → (kind, precision).
ORT_KERNELS = {
    'QLinearConv': ('Convolution', 'int8'),
    'ConvInteger': ('Convolution', 'int8'),
    'Conv': ('Convolution', 'f32'),
    'FusedConv': ('Convolution', 'f32'),
    'MatMulIntegerToFloat': ('MatMul', 'int8'),
    'QLinearMatMul': ('MatMul', 'int8'),
    'MatMulInteger': ('MatMul', 'int8'),
    'DynamicQuantizeMatMul': ('MatMul', 'int8'),
    'QGemm': ('MatMul', 'int8'),
    'MatMulNBits': ('MatMul', 'int4'),
    'MatMul': ('MatMul', 'f32'),
    'FusedMatMul': ('MatMul', 'f32'),
    'Gemm': ('MatMul', 'f32'),
}


def ort_session(model_file: str,
                threads: int = 1,
                level: str = 'all',
                fold_dequantize: bool = False,
                optimized_file: Optional[str] = None) -> Any:
    """An ONNX Runtime CPU ``InferenceSession``.

    Args:
        model_file (str): The ``.onnx`` file.
        threads (int): Intra-op threads (inter-op: 1). Defaults to 1.
        level (str): Graph optimisation level: ``'disable'``, ``'basic'``,
            ``'extended'`` or ``'all'``. Defaults to ``'all'``.
        fold_dequantize (bool): Set :data:`FOLD_DEQUANTIZE_KEY` to ``'1'``,
            so constant weights are dequantized to float once, at session
            start. Defaults to False (ONNX Runtime's default).
        optimized_file (str, optional): Write the optimised graph here.
            Defaults to None.

    Returns:
        onnxruntime.InferenceSession: The session.

    Raises:
        HawqUserError: The file is missing or not a model ONNX Runtime can
            load.
    """
    import onnxruntime as ort
    check_model_file(model_file)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.graph_optimization_level = {
        'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    }[level]
    if fold_dequantize:
        opts.add_session_config_entry(FOLD_DEQUANTIZE_KEY, '1')
    if optimized_file:
        opts.optimized_model_filepath = optimized_file
    try:
        return ort.InferenceSession(model_file, opts,
                                    providers=['CPUExecutionProvider'])
    except Exception as err:  # noqa: BLE001 - reported as one clear line
        raise load_error('ONNX Runtime', model_file, err) from None


class OrtSession(Session):
    """A model on ONNX Runtime's CPU provider.

    Args:
        model_file (str): The ``.onnx`` file.
        threads (int): Intra-op threads. Defaults to 1.
        fold_dequantize (bool): See :func:`ort_session`. Defaults to False.
    """

    runtime = 'onnxruntime'

    def __init__(self, model_file: str, threads: int = 1,
                 fold_dequantize: bool = False) -> None:
        super().__init__(model_file, threads)
        self.fold_dequantize = fold_dequantize
        self.session = ort_session(model_file, threads,
                                   fold_dequantize=fold_dequantize)
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name if inputs else ''
        self.input_shape = tuple(inputs[0].shape) if inputs else ()
        self.input_count = len(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, image: np.ndarray) -> List[np.ndarray]:
        return self.session.run(None, {self.input_name: image})

    def kernel_precisions(self) -> Dict[str, int]:
        import onnx
        with tempfile.TemporaryDirectory() as tmp:
            out = osp.join(tmp, 'optimized.onnx')
            ort_session(self.model_file, self.threads,
                        fold_dequantize=self.fold_dequantize,
                        optimized_file=out)
            nodes = onnx.load(out).graph.node
        return count_kernels([ORT_KERNELS[n.op_type] for n in nodes
                              if n.op_type in ORT_KERNELS])


def dequantize_behaviour(model_file: str) -> List[Dict[str, Any]]:
    """What ONNX Runtime's graph optimisations do to ``DequantizeLinear``.

    The model is optimised at each level, with and without
    :data:`FOLD_DEQUANTIZE_KEY`, and the optimised graph (written by ONNX
    Runtime itself, ``SessionOptions.optimized_model_filepath``) is read
    back.

    Args:
        model_file (str): An exported model.

    Returns:
        list[dict]: Per setting: ``level``, ``fold_dequantize``,
        ``dequantize_nodes`` (in the optimised graph), ``initializers``
        (type name → count) and ``initializer_bytes`` (type name → bytes).
    """
    import onnx
    from onnx import TensorProto
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in ('basic', 'extended', 'all'):
            for fold in (False, True):
                out = osp.join(tmp, f'{level}_{int(fold)}.onnx')
                ort_session(model_file, level=level, fold_dequantize=fold,
                            optimized_file=out)
                proto = onnx.load(out)
                counts: Dict[str, int] = collections.Counter()
                sizes: Dict[str, int] = collections.Counter()
                for t in proto.graph.initializer:
                    kind = TensorProto.DataType.Name(t.data_type)
                    counts[kind] += 1
                    sizes[kind] += len(t.raw_data)
                rows.append(dict(
                    level=level, fold_dequantize=fold,
                    dequantize_nodes=sum(n.op_type == 'DequantizeLinear'
                                         for n in proto.graph.node),
                    initializers=dict(counts),
                    initializer_bytes=dict(sizes)))
    return rows

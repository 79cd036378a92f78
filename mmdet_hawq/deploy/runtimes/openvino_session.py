"""OpenVINO (CPU) sessions.

OpenVINO reads the ONNX export directly. Its low-precision transformations
turn each ``QuantizeLinear`` → ``DequantizeLinear`` pair on an activation,
with an integer weight behind a ``DequantizeLinear``, into an integer
convolution or fully-connected kernel; :meth:`OpenVinoSession.
kernel_precisions` reads which precision each one executes in from the
compiled model's runtime model (``layerType``, ``runtimePrecision``).
"""
import functools
from typing import Any, Dict, List, Optional

import numpy as np

from .base import Session, check_model_file, count_kernels, load_error

__all__ = ['OV_INTEGER_INPUTS', 'OV_KINDS', 'OpenVinoSession']

#: OpenVINO CPU layer types → kernel kind.
OV_KINDS = {'Convolution': 'Convolution', 'FullyConnected': 'MatMul',
            'MatMul': 'MatMul', 'Gemm': 'MatMul',
            'FullyConnectedCompressed': 'MatMul'}

#: Integer element types of a kernel's activation input.
OV_INTEGER_INPUTS = ('u8', 'i8')


@functools.lru_cache(maxsize=None)
def _core() -> Any:
    """One ``openvino.Core`` for the process, outliving every compiled
    model (OpenVINO's advice; a compiled model whose core was collected
    first crashed the process here)."""
    import openvino as ov
    return ov.Core()


class OpenVinoSession(Session):
    """A model compiled by OpenVINO for the CPU, for latency (one stream).

    Args:
        model_file (str): A ``.onnx`` file or an OpenVINO IR ``.xml``.
        threads (int): ``INFERENCE_NUM_THREADS``. Defaults to 1.
        precision (str, optional): ``INFERENCE_PRECISION_HINT`` of the float
            layers: ``'f32'`` (the default here, so a float layer computes
            what ONNX Runtime and PyTorch compute), ``'bf16'``, or None for
            OpenVINO's own default (bf16 on CPUs with AVX-512 BF16 or AMX).
        perf_count (bool): Keep OpenVINO's per-layer performance counters
            (:meth:`profile`). Defaults to False.
    """

    runtime = 'openvino'

    def __init__(self, model_file: str, threads: int = 1,
                 precision: Optional[str] = 'f32',
                 perf_count: bool = False) -> None:
        super().__init__(model_file, threads)
        check_model_file(model_file)
        config = {'INFERENCE_NUM_THREADS': threads, 'NUM_STREAMS': 1,
                  'PERFORMANCE_HINT': 'LATENCY'}
        if precision:
            config['INFERENCE_PRECISION_HINT'] = precision
        if perf_count:
            config['PERF_COUNT'] = True
        self.precision = precision
        try:
            core = _core()
            self.compiled = core.compile_model(core.read_model(model_file),
                                               'CPU', config)
        except Exception as err:  # noqa: BLE001 - one clear line
            raise load_error('OpenVINO', model_file, err) from None
        self.request = self.compiled.create_infer_request()
        inputs = self.compiled.inputs
        self.input_count = len(inputs)
        self.input_name = inputs[0].get_any_name() if inputs else ''
        shape = inputs[0].get_partial_shape() if inputs else None
        self.input_shape = tuple(d.get_length() if d.is_static else -1
                                 for d in shape) if shape else ()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, image: np.ndarray) -> List[np.ndarray]:
        result = self.request.infer({0: image})
        return [np.asarray(result[o]) for o in self.compiled.outputs]

    def kernel_precisions(self) -> Dict[str, int]:
        pairs = []
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = OV_KINDS.get(info['layerType'].astype(str))
            if not kind:
                continue
            first = op.input_value(0).get_element_type().get_type_name()
            primitive = info['primitiveType'].astype(str).lower()
            if first in OV_INTEGER_INPUTS:
                precision = 'int8'
            else:
                precision = 'bf16' if 'bf16' in primitive else \
                    'f16' if 'f16' in primitive else 'f32'
            pairs.append((kind, precision))
        return count_kernels(pairs)

    def profile(self, image: np.ndarray) -> Dict[str, float]:
        """Milliseconds per executed layer type of one run of ``image``
        (after one untimed run), from OpenVINO's performance counters
        (the session needs ``perf_count=True``).

        Returns:
            dict[str, float]: ``'<layer type>/<precision>'`` → ms, largest
            first (precision: the kernel's, e.g. ``I8``, ``bf16``).
        """
        self.run(image)
        self.run(image)
        times: Dict[str, float] = {}
        for node in self.request.get_profiling_info():
            kind = node.exec_type.rsplit('_', 1)[-1] if node.exec_type \
                else ''
            key = f'{node.node_type}/{kind}'
            times[key] = times.get(key, 0.0) + \
                node.real_time.total_seconds() * 1e3
        return dict(sorted(times.items(), key=lambda kv: -kv[1]))

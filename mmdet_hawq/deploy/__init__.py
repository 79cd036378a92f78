"""Deploying what was quantized: ONNX export with integer weights, ONNX
Runtime inference, and PyTorch modules that keep their weights packed.

Sits below :mod:`mmdet_hawq.engine` and above :mod:`mmdet_hawq.quant` and
:mod:`mmdet_hawq.models`. Not imported by ``import mmdet_hawq`` (it needs
``onnx``; :mod:`.onnx_runtime` needs ``onnxruntime``).
"""
from .onnx_export import (DequantizeLinearFunction, DetectorOnnxWrapper,
                          OnnxQuantizedWeight, attach_onnx_quantized_weights,
                          check_opset, export_onnx, operator_layers,
                          stores_int4)
from .onnx_lowering import (ONNX_OPSET, lower_quantized_weights,
                            onnx_weight_summary, pack_int4)
from .packed_weights import (PackedWeight, attach_packed_weights,
                             load_packed, module_weight_bytes,
                             packed_entry_codes)

__all__ = [
    'ONNX_OPSET', 'DequantizeLinearFunction', 'DetectorOnnxWrapper',
    'OnnxQuantizedWeight', 'attach_onnx_quantized_weights', 'check_opset',
    'export_onnx', 'lower_quantized_weights', 'onnx_weight_summary',
    'operator_layers', 'pack_int4', 'PackedWeight',
    'attach_packed_weights', 'load_packed', 'module_weight_bytes',
    'packed_entry_codes', 'stores_int4'
]

"""Quantization primitives: the symmetric per-tensor quantizer (Eq. 6),
weight selection, precision plans applied by one function (nearest or
GPTQ), packed low-bit checkpoints, and activation quantizers."""
from .gptq import GptqResult, gptq_apply, gptq_error_ratios, gptq_quantize
from .gptq_inputs import hessian_bytes
from .packing import (is_packed, pack_codes, pack_state_dict,
                      unpack_checkpoint, unpack_codes)
from .plan import (ROUNDINGS, PlanEntry, PrecisionPlan, apply_plan,
                   load_plan, make_plan, plan_bits, plan_stats,
                   quantize_weights_, save_plan, temporarily_quantized,
                   uniform_plan, validate_plan)
from .quantizer import (QuantizedWeight, check_bits, choose_scale, dequantize,
                        error_terms, fake_quantize, quantization_error,
                        quantize_codes, quantize_weight)
from .selection import (DEFAULT_EXCLUDE, WeightInfo, bit_floors,
                        list_weights,
                        quantizable_weights, weight_group)

__all__ = [
    'GptqResult', 'gptq_apply', 'gptq_error_ratios', 'gptq_quantize',
    'hessian_bytes',
    'is_packed', 'pack_codes', 'pack_state_dict', 'unpack_checkpoint',
    'unpack_codes', 'ROUNDINGS', 'PlanEntry', 'PrecisionPlan', 'apply_plan',
    'load_plan', 'make_plan', 'plan_bits', 'plan_stats',
    'quantize_weights_', 'save_plan', 'temporarily_quantized',
    'uniform_plan', 'validate_plan', 'QuantizedWeight', 'check_bits',
    'choose_scale', 'dequantize', 'error_terms', 'fake_quantize',
    'quantization_error', 'quantize_codes', 'quantize_weight',
    'DEFAULT_EXCLUDE', 'WeightInfo', 'bit_floors', 'list_weights',
    'quantizable_weights', 'weight_group'
]

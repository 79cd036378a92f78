"""The library API: ``quantize(model, calibration, settings)``.

Example:
    >>> from mmdet_hawq.api import QuantSettings, quantize
    >>> settings = QuantSettings(metric='outquant', target_bits=5)
    >>> result = quantize(model, calibration, settings)
    >>> result.summary['avg_bits'], result.plan['backbone.conv1.weight']
"""
from .quantize import (Calibration, QuantResult, check_model, quantize,
                       weight_floors)
from .traces import distillation_objective
from .settings import (METRICS, SENSITIVITY_METRICS, ActivationSettings,
                       CalibrationSettings, GptqSettings, QuantSettings,
                       SensitivitySettings)

__all__ = [
    'Calibration', 'QuantResult', 'check_model', 'quantize', 'weight_floors',
    'METRICS', 'SENSITIVITY_METRICS', 'ActivationSettings',
    'CalibrationSettings', 'GptqSettings', 'QuantSettings',
    'SensitivitySettings', 'distillation_objective'
]

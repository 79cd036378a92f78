# W8A8: every weight at 8 bits, and every activation site (the quantized
# layers' inputs, the convolutions' outputs) at 8 bits with MSE ranges from
# the calibration images; each site's predicted damage is reported
_base_ = './detr_tiny_shapes_uniform_8bit.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='uniform', bits=8,
         activations=dict(bits=8, method='mse', sensitivity=True))
]

# W8A8: every weight at 8 bits, and the inputs of the quantized layers at
# 8 bits with MSE ranges from the calibration images
_base_ = './deformable_detr_tiny_shapes_uniform_8bit.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='uniform', bits=8,
         activations=dict(bits=8, method='mse'))
]

# W4A8: the Out Sen Quant 4-bit plan with GPTQ rounding, and
# every activation site at 8 bits with MSE ranges from the calibration
# images; each site's predicted damage is reported
_base_ = './dino_tiny_shapes_outquant_4bit_gptq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outquant', target_bits=4,
         bit_range=(3, 6), rounding='gptq',
         activations=dict(bits=8, method='mse', sensitivity=True))
]

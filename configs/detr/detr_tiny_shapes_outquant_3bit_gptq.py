# Out Sen Quant at 3 bits on average, GPTQ rounding on the paper's grid
_base_ = './detr_tiny_shapes_outquant_4bit.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outquant', target_bits=3,
         bit_range=(2, 5), rounding='gptq')
]

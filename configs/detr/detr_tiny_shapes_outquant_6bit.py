_base_ = '../_base_/detr_tiny_shapes_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outquant', target_bits=6,
         bit_range=(4, 7))
]

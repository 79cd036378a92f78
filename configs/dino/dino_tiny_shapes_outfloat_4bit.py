_base_ = '../_base_/dino_tiny_shapes_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outfloat', target_bits=4,
         bit_range=(3, 6))
]

_base_ = '../_base_/dino_tiny_shapes_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='losssen', target_bits=5,
         bit_range=(3, 6))
]

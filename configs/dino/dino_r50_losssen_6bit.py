_base_ = '../_base_/dino_r50_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='losssen', target_bits=6,
         bit_range=(4, 7))
]

_base_ = '../_base_/dab_detr_r50_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outfloat', target_bits=6,
         bit_range=(4, 7))
]

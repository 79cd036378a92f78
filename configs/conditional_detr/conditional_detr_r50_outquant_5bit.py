_base_ = '../_base_/conditional_detr_r50_hawq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outquant', target_bits=5,
         bit_range=(3, 6))
]

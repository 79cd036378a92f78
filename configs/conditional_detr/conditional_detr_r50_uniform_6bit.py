_base_ = '../_base_/conditional_detr_r50_hawq.py'
custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform', bits=6)]

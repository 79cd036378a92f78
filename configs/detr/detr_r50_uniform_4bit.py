_base_ = '../_base_/detr_r50_hawq.py'
custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform', bits=4)]

_base_ = '../_base_/dino_r50_hawq.py'
custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform', bits=6)]

_base_ = '../_base_/detr_tiny_shapes_hawq.py'
custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform', bits=8)]

_base_ = '../_base_/deformable_detr_tiny_shapes_hawq.py'
custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform', bits=4)]

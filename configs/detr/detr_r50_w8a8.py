# W8A8 on COCO: every weight at 8 bits and every activation site at 8 bits
# (MSE ranges), each site's predicted damage reported
_base_ = './detr_r50_uniform_8bit.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='uniform', bits=8,
         activations=dict(bits=8, method='mse', sensitivity=True))
]

# W8A8 with per-channel weight scales and minmax activation ranges: ours in
# the OpenVINO / NNCF benchmark (docs/deployment.md), 0.3 mAP above
# per-tensor weights on the small DETR
_base_ = './detr_tiny_shapes_uniform_8bit.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='uniform', bits=8,
         per_channel=True, activations=dict(bits=8, method='minmax'))
]

# DETR-R50 on COCO (mmdet's config, unchanged) with the plugin loaded. Pass
# the checkpoint with --checkpoint (mmdet's or the official
# facebookresearch one).
_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'
custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)
# No ImageNet download at build time: the checkpoint provides every weight.
model = dict(backbone=dict(init_cfg=None))

# Conditional DETR R50 (mmdet's config, unchanged) on COCO
# with the plugin loaded. Pass mmdet's released checkpoint with --checkpoint.
_base_ = 'mmdet::conditional_detr/conditional-detr_r50_8xb2-50e_coco.py'
custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)
# No ImageNet download at build time: the checkpoint provides every weight.
model = dict(backbone=dict(init_cfg=None))

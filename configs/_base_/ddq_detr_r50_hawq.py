# DDQ-DETR-4scale R50 (mmdet's config, unchanged) on COCO
# with the plugin loaded. Pass mmdet's released checkpoint with --checkpoint.
_base_ = 'mmdet::ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py'
custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)
# No ImageNet download at build time: the checkpoint provides every weight.
model = dict(backbone=dict(init_cfg=None))

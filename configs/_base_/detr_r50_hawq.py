# DETR-R50 on COCO (mmdet's config, unchanged) with the plugin loaded, and
# mmdet's trained checkpoint (its metafile's); --checkpoint takes another
# (a local file, or the official facebookresearch one).
_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'
custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)
# No ImageNet download at build time: the checkpoint provides every weight.
model = dict(backbone=dict(init_cfg=None))
load_from = ('https://download.openmmlab.com/mmdetection/v3.0/detr/'
             'detr_r50_8xb2-150e_coco/'
             'detr_r50_8xb2-150e_coco_20221023_153551-436d03e8.pth')

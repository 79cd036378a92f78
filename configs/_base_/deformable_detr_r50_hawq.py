# Two-stage Deformable DETR with box refinement, R50, on COCO (mmdet's config,
# unchanged; base on mmdet's plain or refine-only config for those variants)
# with the plugin loaded. Pass mmdet's released checkpoint with --checkpoint.
_base_ = ('mmdet::deformable_detr/'
          'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py')
custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)
# No ImageNet download at build time: the checkpoint provides every weight.
model = dict(backbone=dict(init_cfg=None))

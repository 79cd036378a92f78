# The shapes benchmark's data, for the DETR-family models that take an mmdet
# COCO config as their other base. Names carry a shapes_ prefix because
# mmengine forbids a key that two bases both define; a model config copies
# them over mmdet's COCO ones with {{_base_.shapes_*}}.
shapes_root = 'data/shapes/'
shapes_scale = (128, 128)
shapes_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=shapes_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
shapes_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=shapes_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor'))
]
shapes_train_dataloader = dict(
    batch_size=8, num_workers=1,
    dataset=dict(
        type='ShapesDataset', data_root=shapes_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'), pipeline=shapes_train_pipeline))
shapes_val_dataloader = dict(
    batch_size=16, num_workers=1,
    dataset=dict(
        type='ShapesDataset', data_root=shapes_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'), pipeline=shapes_test_pipeline))
shapes_evaluator = dict(
    ann_file=shapes_root + 'annotations/instances_val.json')
# The small backbone every shapes model starts from (ResNet-18 at half width,
# three stages, pretrained on the train split by configs/shapes/
# shapes_backbone_pretrain.py), its last two stages out (64 and 128 channels
# at strides 8 and 16).
shapes_backbone = dict(
    depth=18, base_channels=32, num_stages=3, out_indices=(1, 2),
    strides=(1, 2, 2),
    dilations=(1, 1, 1), frozen_stages=-1,
    norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
    init_cfg=dict(type='Pretrained', prefix='backbone.',
                  checkpoint='checkpoints/shapes_backbone.pth'))

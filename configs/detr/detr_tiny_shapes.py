# A small DETR (mmdet's own DETR class: ResNet-18 at half width, ChannelMapper,
# 3+3 transformer layers of width 128, 20 queries, DETRHead) trained from
# scratch on the synthetic shapes benchmark (tools/make_shapes_dataset.py).
_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'

custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)

embed_dims = 128
ffn_cfg = dict(embed_dims=embed_dims, feedforward_channels=512)
attn_cfg = dict(embed_dims=embed_dims, num_heads=8)
model = dict(
    num_queries=20,
    backbone=dict(
        depth=18, base_channels=32, num_stages=3, out_indices=(2, ),
        strides=(1, 2, 2), dilations=(1, 1, 1),
        frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        # pretrained by the project on the shapes train split (make train;
        # configs/shapes/shapes_backbone_pretrain.py): no ImageNet weights here
        init_cfg=dict(type='Pretrained', prefix='backbone.',
                      checkpoint='checkpoints/shapes_backbone.pth')),
    neck=dict(in_channels=[128], out_channels=embed_dims),
    encoder=dict(
        num_layers=3,
        layer_cfg=dict(self_attn_cfg=attn_cfg, ffn_cfg=ffn_cfg)),
    decoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=attn_cfg, cross_attn_cfg=attn_cfg,
            ffn_cfg=ffn_cfg)),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(num_classes=4, embed_dims=embed_dims),
    test_cfg=dict(max_per_img=20))

dataset_type = 'ShapesDataset'
data_root = 'data/shapes/'
img_scale = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor'))
]
train_dataloader = dict(
    batch_size=8, num_workers=1,
    dataset=dict(
        type=dataset_type, data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16, num_workers=1,
    dataset=dict(
        type=dataset_type, data_root=data_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_epochs = 50
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.5)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=300),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[40], gamma=0.1)
]
default_hooks = dict(
    checkpoint=dict(interval=2, max_keep_ckpts=2),
    logger=dict(interval=50))
auto_scale_lr = dict(enable=False, base_batch_size=16)

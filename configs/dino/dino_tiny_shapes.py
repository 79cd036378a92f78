# A small DINO (mmdet's own DINO class: the shapes ResNet-18 at half width,
# 3 feature levels of width 256, 3+3 deformable transformer
# layers (2 sampling points), 30
# queries, 30 denoising queries, DINOHead with sigmoid/focal classes) trained
# on the synthetic shapes benchmark (make train-dino).
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
          '../_base_/shapes_detection.py']

custom_imports = dict(imports=['mmdet_hawq'], allow_failed_imports=False)

# 256: mmdet's DINO decoder and two-stage proposals fix 128 position
# features per coordinate, so their layers need embed_dims = 256.
embed_dims = 256
num_levels = 3
ffn_cfg = dict(embed_dims=embed_dims, feedforward_channels=256)
model = dict(
    num_queries=30,
    num_feature_levels=num_levels,
    backbone={{_base_.shapes_backbone}},
    neck=dict(in_channels=[64, 128], out_channels=embed_dims,
              num_outs=num_levels),
    encoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_levels=num_levels,
                               num_points=2),
            ffn_cfg=ffn_cfg)),
    decoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims),
            cross_attn_cfg=dict(embed_dims=embed_dims, num_levels=num_levels,
                                num_points=2),
            ffn_cfg=ffn_cfg)),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(num_classes=4, embed_dims=embed_dims),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=30)),
    test_cfg=dict(max_per_img=30))

train_dataloader = {{_base_.shapes_train_dataloader}}
val_dataloader = {{_base_.shapes_val_dataloader}}
test_dataloader = val_dataloader
val_evaluator = {{_base_.shapes_evaluator}}
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.5)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=300),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[10], gamma=0.1)
]
default_hooks = dict(
    checkpoint=dict(interval=1, max_keep_ckpts=2),
    logger=dict(interval=50))
auto_scale_lr = dict(enable=False, base_batch_size=16)

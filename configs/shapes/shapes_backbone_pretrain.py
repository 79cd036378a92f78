# Pretrain the small DETR's backbone on the shapes training split (dense
# per-cell shape classification from the boxes; see BackbonePretrainer).
# tools/export_checkpoint.py then writes checkpoints/shapes_backbone.pth,
# which configs/detr/detr_tiny_shapes.py starts from.
_base_ = '../detr/detr_tiny_shapes.py'

model = dict(
    _delete_=True,
    type='BackbonePretrainer',
    backbone=dict(
        type='ResNet', depth=18, base_channels=32, num_stages=3,
        out_indices=(2, ), strides=(1, 2, 2), dilations=(1, 1, 1),
        frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False, style='pytorch'),
    in_channels=128,
    num_classes=4,
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=1))

train_dataloader = dict(batch_size=16)
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=100)
val_cfg = None
val_dataloader = None
val_evaluator = None
test_cfg = None
test_dataloader = None
test_evaluator = None
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4))
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True,
         eta_min=1e-5)
]
default_hooks = dict(checkpoint=dict(interval=4, max_keep_ckpts=1))

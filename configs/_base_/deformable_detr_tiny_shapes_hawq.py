# The small two-stage Deformable DETR on the shapes benchmark, with its
# shipped checkpoint; configs/deformable_detr/deformable_detr_tiny_shapes_*
# add one hook each.
_base_ = '../deformable_detr/deformable_detr_tiny_shapes.py'
load_from = 'checkpoints/deformable_detr_tiny_shapes.pth'

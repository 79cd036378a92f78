# The small DETR on the shapes benchmark, with its shipped checkpoint; the
# configs/detr/detr_tiny_shapes_* files add one DistillSensitivityHook each.
_base_ = '../detr/detr_tiny_shapes.py'
load_from = 'checkpoints/detr_tiny_shapes.pth'

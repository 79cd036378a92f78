# The small DINO on the shapes benchmark, with its shipped
# checkpoint; the configs/dino/dino_tiny_shapes_* files add one hook each.
_base_ = '../dino/dino_tiny_shapes.py'
load_from = 'checkpoints/dino_tiny_shapes.pth'

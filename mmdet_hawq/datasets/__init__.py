"""The synthetic shapes benchmark (the small models' data) and its mmdet
dataset class."""
from .shapes_dataset import ShapesDataset
from .synthetic_shapes import (SHAPES_CLASSES, ShapesSpec,
                               generate_shapes_dataset, generate_split,
                               render_image)

__all__ = [
    'ShapesDataset', 'SHAPES_CLASSES', 'ShapesSpec',
    'generate_shapes_dataset', 'generate_split', 'render_image'
]

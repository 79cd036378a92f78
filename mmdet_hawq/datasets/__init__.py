from .shapes_dataset import ShapesDataset
from .synthetic_shapes import (SHAPES_CLASSES, ShapesSpec, dataset_is_complete,
                               generate_shapes_dataset, generate_split,
                               render_image)

__all__ = [
    'ShapesDataset', 'SHAPES_CLASSES', 'ShapesSpec', 'dataset_is_complete',
    'generate_shapes_dataset', 'generate_split', 'render_image'
]

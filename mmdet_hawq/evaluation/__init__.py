"""Evaluation beyond mmdet's ``CocoMetric``: bootstrap intervals of mAP over
the evaluation images."""
from .bootstrap import coco_map_bootstrap, matched_images, resampled_map

__all__ = ['coco_map_bootstrap', 'matched_images', 'resampled_map']

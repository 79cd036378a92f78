"""mmdet's ``CocoDataset`` with the synthetic benchmark's classes."""
import os.path as osp
from typing import List

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from ..errors import HawqUserError
from .synthetic_shapes import SHAPES_CLASSES


@DATASETS.register_module()
class ShapesDataset(CocoDataset):
    """The synthetic shapes benchmark, read by mmdet's COCO loader.

    It only fixes the class names (so ``CocoMetric``'s category ids ``1..K``
    agree with the JSON) and turns a missing annotation file into one clear
    error that says how to generate the data.
    """

    METAINFO = dict(
        classes=SHAPES_CLASSES,
        palette=[(220, 20, 60), (0, 128, 255), (0, 200, 0), (255, 160, 0)])

    def load_data_list(self) -> List[dict]:
        """Check the annotation file exists, then load it as COCO."""
        if not osp.isfile(self.ann_file):
            raise HawqUserError(
                f'annotation file {self.ann_file!r} does not exist: generate '
                'the benchmark with `make data` (or `python '
                'tools/make_shapes_dataset.py --out-dir '
                f'{osp.dirname(osp.dirname(self.ann_file)) or "."}`) or set '
                'data_root to where it is')
        return super().load_data_list()

"""Dense shape-class pretraining of a detector backbone on box labels.

DETR normally starts from an ImageNet backbone; none can be downloaded here,
so the small benchmark DETR starts from a backbone pretrained on the
synthetic training split itself: every cell of the backbone's output map is
classified as background or as the class of the smallest ground-truth box
that contains the cell's centre (cross-entropy). Only the training split's
boxes and labels are used.
"""
from typing import Dict, List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel

from mmdet.registry import MODELS


@MODELS.register_module()
class BackbonePretrainer(BaseModel):
    """A backbone plus a 1x1 classifier over its last feature map.

    Args:
        backbone (dict): Config of the backbone (e.g. mmdet's ``ResNet``).
        in_channels (int): Channels of the backbone's last output.
        num_classes (int): Number of object classes (background is added).
        data_preprocessor (dict): Config of the data preprocessor.
    """

    def __init__(self, backbone: dict, in_channels: int, num_classes: int,
                 data_preprocessor: dict) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.backbone = MODELS.build(backbone)
        self.num_classes = num_classes
        self.cls = nn.Conv2d(in_channels, num_classes + 1, 1)

    @staticmethod
    def cell_targets(data_samples: List, shape: torch.Size,
                     num_classes: int) -> torch.Tensor:
        """Per-cell labels (B, h, w): class of the smallest box containing
        the cell centre, ``num_classes`` for background."""
        b, h, w = len(data_samples), shape[-2], shape[-1]
        target = torch.full((b, h, w), num_classes, dtype=torch.long)
        for i, sample in enumerate(data_samples):
            ih, iw = sample.batch_input_shape
            ys = (torch.arange(h) + 0.5) * ih / h
            xs = (torch.arange(w) + 0.5) * iw / w
            boxes = sample.gt_instances.bboxes.cpu()
            labels = sample.gt_instances.labels.cpu()
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            for k in torch.argsort(area, descending=True).tolist():
                x1, y1, x2, y2 = boxes[k].tolist()
                inside = ((ys >= y1) & (ys < y2))[:, None] & (
                    (xs >= x1) & (xs < x2))[None]
                target[i][inside] = labels[k]
        return target

    def forward(self, inputs: torch.Tensor, data_samples=None,
                mode: str = 'tensor') -> Union[Dict, torch.Tensor, List]:
        logits = self.cls(self.backbone(inputs)[-1])  # (B, K+1, h, w)
        if mode == 'tensor':
            return logits
        target = self.cell_targets(data_samples, logits.shape,
                                   self.num_classes).to(logits.device)
        if mode == 'loss':
            weight = torch.ones(self.num_classes + 1, device=logits.device)
            weight[-1] = 0.2  # background cells dominate
            return dict(loss_cell=F.cross_entropy(logits, target, weight))
        acc = (logits.argmax(1) == target).float().mean()
        return [dict(cell_accuracy=acc)]

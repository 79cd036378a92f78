"""Official-format DETR-R50 state dicts for the tests, from the key list that
the original code wrote (``fixtures/detr_r50_official_keys.json``; remade by
``.venv-detr-ref/bin/python tests/test_models/detr_reference.py keys
tests/test_models/fixtures/detr_r50_official_keys.json``)."""
import copy
import json
import os.path as osp
from collections import OrderedDict
from typing import Dict

import torch
from mmengine.config import Config

from ..conftest import ROOT

KEYS_FILE = osp.join(osp.dirname(osp.abspath(__file__)), 'fixtures',
                     'detr_r50_official_keys.json')
R50_CONFIG = osp.join(ROOT, 'configs', '_base_', 'detr_r50_hawq.py')


def official_keys() -> Dict:
    """The key list: ``state_dict`` (name -> shape), ``coco_categories``
    (torchvision's name of each COCO id 0..90) and the versions used."""
    with open(KEYS_FILE) as f:
        return json.load(f)


def random_official_state(seed: int = 0) -> 'OrderedDict[str, torch.Tensor]':
    """Random tensors with the official DETR-R50's names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (k, torch.randn(shape, generator=gen))
        for k, shape in official_keys()['state_dict'].items())


def build_detr_r50(config: str = R50_CONFIG):
    """mmdet's DETR-R50 from the project's config (no ImageNet download:
    ``backbone.init_cfg`` is None there), in eval mode."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(config)
    assert cfg.model.backbone.init_cfg is None
    return MODELS.build(copy.deepcopy(cfg.model)).eval()

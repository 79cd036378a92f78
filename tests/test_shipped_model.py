"""The shipped small DETR: strict loading, and the README's float mAP
reproduced by mmdet's own test script on the generated val split."""
import copy
import json
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config

from .conftest import ROOT, run_tool

CKPT = osp.join(ROOT, 'checkpoints', 'detr_tiny_shapes.pth')
RESULT = osp.join(ROOT, 'checkpoints', 'detr_tiny_shapes.json')
VAL = osp.join(ROOT, 'data', 'shapes', 'annotations', 'instances_val.json')


def test_checkpoint_loads_with_no_missing_or_unexpected_keys():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'detr_tiny_shapes.py'))
    model = MODELS.build(copy.deepcopy(cfg.model))
    state = torch.load(CKPT, weights_only=True)['state_dict']
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    assert osp.getsize(CKPT) < 10 * 2**20


@pytest.mark.skipif(not osp.isfile(VAL),
                    reason='run `make data` first (make test does)')
def test_mmdet_test_script_reproduces_the_readme_map(tmp_path):
    import mmdet
    test_py = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools',
                       'test.py')
    proc = run_tool(test_py, 'configs/detr_tiny_shapes.py', CKPT,
                    '--work-dir', str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', proc.stdout)[-1])
    recorded = json.load(open(RESULT))['coco/bbox_mAP']
    readme = open(osp.join(ROOT, 'README.md')).read()
    assert f'{recorded:.3f}' in readme
    assert abs(got - recorded) <= 0.005

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

pytestmark = pytest.mark.slow

CKPT = osp.join(ROOT, 'checkpoints', 'detr_tiny_shapes.pth')
RESULT = osp.join(ROOT, 'checkpoints', 'detr_tiny_shapes.json')
VAL = osp.join(ROOT, 'data', 'shapes', 'annotations', 'instances_val.json')


def test_checkpoint_loads_with_no_missing_or_unexpected_keys():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'detr', 'detr_tiny_shapes.py'))
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
    proc = run_tool(test_py, 'configs/detr/detr_tiny_shapes.py', CKPT,
                    '--work-dir', str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', proc.stdout)[-1])
    recorded = json.load(open(RESULT))['coco/bbox_mAP']
    readme = open(osp.join(ROOT, 'README.md')).read()
    assert f'{recorded:.3f}' in readme
    assert abs(got - recorded) <= 0.005


@pytest.mark.skipif(not osp.isfile(VAL),
                    reason='run `make data` first (make test does)')
def test_shipped_detr_5bit_plan_is_the_same_on_1_and_2_threads(tmp_path):
    """Issue 15 item 7 on the shipped small DETR (its 5-bit Out Sen Quant
    plan, from a short calibration): float32 sums split over 1 or 2
    intra-op threads move the traces by ~1e-8, which the ILP's rounded
    inputs do not see."""
    from mmengine.runner import Runner

    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'detr',
                                   'detr_tiny_shapes_outquant_5bit.py'))
    cfg.custom_hooks = []
    cfg.load_from = CKPT
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    state = copy.deepcopy(runner.model.state_dict())
    threads_before = torch.get_num_threads()
    plans, traces = {}, {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runner.model.load_state_dict(state)
            hook = DistillSensitivityHook(
                metric='outquant', target_bits=5, bit_range=(3, 6),
                save_packed=False, out_subdir=f'threads{threads}',
                calibration=dict(num_images=8, batch_size=4),
                sensitivity=dict(min_samples=3, max_samples=3,
                                 use_cache=False))
            hook.before_test(runner)
            out = osp.join(str(tmp_path), f'threads{threads}')
            plans[threads] = json.load(open(osp.join(out, 'plan.json')))
            t = json.load(open(osp.join(out, 'traces.json')))
            traces[threads] = torch.tensor(t['samples'],
                                           dtype=torch.float64).mean(0)
    finally:
        torch.set_num_threads(threads_before)
    rel = ((traces[1] - traces[2]).abs() /
           traces[1].abs().clamp_min(1e-300)).median().item()
    print(f'shipped DETR: median rel. trace difference 1 vs 2 threads '
          f'{rel:.3g}')
    assert rel < 1e-4
    assert len(plans[1]) == 47 and plans[1] == plans[2]

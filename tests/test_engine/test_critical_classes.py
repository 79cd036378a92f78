"""``sensitivity.critical_classes`` through the hook in mmengine's Runner on
the tiny DETR: the restricted objective changes the traces, names are
checked before any data, and the cache key of the default is unchanged."""
import copy
import json
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from mmdet_hawq.datasets import SHAPES_CLASSES
from mmdet_hawq.engine.hooks import DistillSensitivityHook
from mmdet_hawq.api import check_model
from mmdet_hawq.api import CalibrationSettings, QuantSettings
from mmdet_hawq.api.traces import cache_key
from mmdet_hawq.engine import run
from mmdet_hawq.engine.calibration import calibration_classes
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import load_plan, plan_bits

#: The settings in a trace cache key before the option existed.
KEY_SETTINGS = {'estimator', 'num_images', 'batch_size', 'seed',
                'lambda_kl', 'temperature', 'decoder_layers', 'proposals',
                'dataset'}


def run_hook(cfg, work_dir, **sensitivity):
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric='outquant', target_bits=4,
        bit_range=(3, 6), save_packed=False,
        calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2, **sensitivity))]
    Runner.from_cfg(cfg).test()
    out = osp.join(work_dir, 'hawq')
    return (plan_bits(load_plan(osp.join(out, 'plan.json'))),
            json.load(open(osp.join(out, 'traces.json'))))


def test_critical_classes_change_the_traces_in_the_runner(tiny_cfg,
                                                          tmp_path):
    plan, traces = run_hook(tiny_cfg, str(tmp_path / 'all'))
    c_plan, c_traces = run_hook(tiny_cfg, str(tmp_path / 'critical'),
                                critical_classes=['cross', 'ellipse'])
    assert set(c_plan) == set(plan)
    assert all(3 <= b <= 6 for b in c_plan.values())
    assert c_traces['names'] == traces['names']
    full = torch.tensor(traces['mean'])
    restricted = torch.tensor(c_traces['mean'])
    # layers that reach the class head see a smaller KL term; the box term
    # is the same
    assert not torch.equal(full, restricted)
    assert ((full - restricted).abs() > 1e-3 * full.abs()).sum() > \
        len(full) // 2
    key = c_traces['meta']['key']['settings']
    assert key['critical_classes'] == ['ellipse', 'cross']  # column order
    assert set(traces['meta']['key']['settings']) == KEY_SETTINGS


def test_default_cache_key_is_unchanged():
    s = QuantSettings(target_bits=4).trace_settings()
    assert s['critical_classes'] is None
    source, cpu = dict(model='m', checkpoint=None), torch.device('cpu')
    key = cache_key('outquant', s, [1, 2], source, None, cpu)
    assert set(key['settings']) == KEY_SETTINGS
    named = cache_key('outquant', dict(s, critical_classes=['cross']),
                      [1, 2], source, None, cpu)
    assert named['settings']['critical_classes'] == ['cross']


def one_line(err) -> str:
    msg = str(err.value)
    assert '\n' not in msg
    return msg


def test_unknown_class_name_stops_before_any_data(build_tiny_model,
                                                  tiny_cfg):
    model = build_tiny_model()
    hook = DistillSensitivityHook(
        metric='outquant', target_bits=4,
        sensitivity=dict(critical_classes=['triangle', 'crss']))
    classes = calibration_classes(tiny_cfg, hook.settings.calibration)
    assert classes == list(SHAPES_CLASSES)
    with pytest.raises(HawqUserError) as err:
        check_model(model, hook.settings, classes)
    msg = one_line(err)
    assert ("sensitivity critical_classes: 'crss' is not a class of the "
            'dataset: the classes are ellipse, rectangle, triangle, cross; '
            "did you mean 'cross'?") == msg
    check_model(model, hook.settings)  # classes unknown: checked later


def test_unknown_name_is_caught_at_the_dataset_without_declared_classes(
        tiny_cfg, tmp_path, monkeypatch):
    """A dataset config that does not declare its classes: the built
    calibration set's metainfo is checked, before any trace sample."""
    monkeypatch.setattr(run, 'calibration_classes', lambda cfg, s: None)
    with pytest.raises(HawqUserError) as err:
        run_hook(tiny_cfg, str(tmp_path), critical_classes=['square'])
    assert "'square' is not a class of the dataset" in one_line(err)
    assert not osp.exists(osp.join(str(tmp_path), 'hawq', 'cache'))


@pytest.mark.parametrize('value,match', [
    ([], 'is empty'),
    (['cross', 'cross'], "lists 'cross' more than once"),
    (['cross', 3], '3 is not a class name'),
    (3, 'give a list of class names'),
])
def test_bad_forms_are_one_line(value, match):
    with pytest.raises(HawqUserError, match=match) as err:
        QuantSettings(target_bits=4,
                      sensitivity=dict(critical_classes=value))
    one_line(err)


def test_one_name_and_the_metrics_it_applies_to():
    s = QuantSettings(metric='outfloat', target_bits=4,
                      sensitivity=dict(critical_classes='cross')).sensitivity
    assert s.critical_classes == ['cross']
    with pytest.raises(HawqUserError, match="metric 'losssen'") as err:
        QuantSettings(metric='losssen', target_bits=4,
                      sensitivity=dict(critical_classes=['cross']))
    one_line(err)


def test_declared_classes_follow_the_calibration_dataset(tiny_cfg):
    ds = copy.deepcopy(tiny_cfg.train_dataloader.dataset)
    ds['metainfo'] = dict(classes=('a', 'b'))
    assert calibration_classes(tiny_cfg, CalibrationSettings(
        dataset=ds)) == ['a', 'b']
    assert calibration_classes(tiny_cfg, None) == list(SHAPES_CLASSES)

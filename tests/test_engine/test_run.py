"""A quantization run in mmengine's Runner (engine/run.py, through the
hook) on a tiny DETR with ``rounding='gptq'``: every metric, the packed
checkpoint, GPTQ-aware error terms, settings, and one calibration set and
one settings resolution per run."""
import copy
import json
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from mmdet_hawq.engine.hooks import DistillSensitivityHook
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (quantizable_weights, quantize_weight,
                              unpack_checkpoint)

CAL = dict(num_images=4, batch_size=2)
SENS = dict(min_samples=2, max_samples=2)


def run_hook(cfg, work_dir, **hook):
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', **hook)]
    runner = Runner.from_cfg(cfg)
    runner.test()
    out = osp.join(cfg.work_dir, 'hawq')
    load = lambda name: json.load(open(osp.join(out, name)))  # noqa: E731
    return runner, out, load


@pytest.mark.parametrize('metric', ['uniform', 'plan', 'losssen',
                                    'outfloat', 'outquant'])
def test_every_metric_rounds_with_gptq(tiny_cfg, build_tiny_model, tmp_path,
                                       metric):
    kwargs = dict(metric=metric, rounding='gptq', calibration=CAL,
                  sensitivity=SENS)
    if metric == 'uniform':
        kwargs['bits'] = 3
    elif metric == 'plan':
        model = build_tiny_model()
        plan = {n: 3 + i % 3 for i, n in enumerate(quantizable_weights(
            model))}
        path = tmp_path / 'plan.json'
        path.write_text(json.dumps(plan))
        kwargs['plan_file'] = str(path)
    else:
        kwargs.update(target_bits=4, bit_range=(3, 6))
        if metric == 'losssen':
            kwargs['sensitivity']['estimator'] = 'hutchinson'
    runner, out, load = run_hook(tiny_cfg, tmp_path / metric, **kwargs)
    summary, layers = load('summary.json'), load('layers.json')
    assert summary['rounding'] == 'gptq' and summary['rounding_seconds'] > 0
    rows = {r['name']: r for r in layers if r['included']}
    assert rows['query_embedding.weight']['rounding'] == 'nearest'
    assert 'no GPTQ path' in rows['query_embedding.weight']['rounding_note']
    gptq_rows = [n for n, r in rows.items() if r['rounding'] == 'gptq']
    assert len(gptq_rows) == len(rows) - 1
    # the packed checkpoint reloads the quantized model bit for bit
    model = runner.model
    packed = torch.load(osp.join(out, 'packed.pth'), weights_only=False)
    state = unpack_checkpoint(packed)['state_dict']
    own = model.state_dict()
    assert set(state) == set(own)
    assert all(torch.equal(state[k], own[k]) for k in own)
    # the codes are GPTQ's, not nearest rounding's
    float_model = build_tiny_model()
    floats = dict(float_model.named_parameters())
    plan = load('plan.json')
    assert all(plan[n] == dict(bits=plan[n]['bits'], axis=None,
                               rounding='gptq') for n in gptq_rows)
    plan = {n: e['bits'] for n, e in plan.items()}
    differ = [n for n in gptq_rows if not torch.equal(
        own[n], quantize_weight(floats[n].data, plan[n]).dequantize())]
    assert len(differ) >= len(gptq_rows) // 2
    for n in gptq_rows:  # same grid: the float weight's Eq. 6 scale
        assert torch.equal(packed['packed'][n]['scale'],
                           quantize_weight(floats[n].data, plan[n]).scale)


def test_gptq_error_terms_scale_the_nearest_terms(tiny_cfg, tmp_path):
    sens = dict(SENS, cache_dir=str(tmp_path / 'cache'))
    common = dict(metric='outquant', target_bits=4, bit_range=(3, 5),
                  calibration=CAL, sensitivity=sens, save_packed=False)
    _, _, near = run_hook(tiny_cfg, tmp_path / 'near', rounding='gptq',
                          **common)
    _, _, scaled = run_hook(tiny_cfg, tmp_path / 'gptq', rounding='gptq',
                            gptq=dict(error_terms='gptq'), **common)
    a = {r['name']: r for r in near('layers.json') if r['included']}
    b = {r['name']: r for r in scaled('layers.json') if r['included']}
    assert 'gptq_error_ratio' not in a['backbone.conv1.weight']
    ratios = []
    for name, row in b.items():
        for bits, ratio in row['gptq_error_ratio'].items():
            # both columns hold what the ILP sees: 3 significant digits
            want = a[name]['error_by_bits'][bits] * ratio
            assert row['error_by_bits'][bits] == pytest.approx(
                want, rel=1.1e-2, abs=1e-300)
            ratios.append(ratio)
    assert b['query_embedding.weight']['gptq_error_ratio']['3'] == 1.0
    assert sum(r < 1 for r in ratios) > len(ratios) // 2
    assert scaled('summary.json')['gptq']['error_terms'] == 'gptq'


@pytest.mark.parametrize('kwargs,message', [
    (dict(rounding='gptqq'), "rounding 'gptqq' is unknown: use one of "
     'nearest, gptq'),
    (dict(gptq=dict(damp=0.1)), "gptq settings are given but rounding is "
     "'nearest': pass rounding='gptq'"),
    (dict(rounding='gptq', gptq=dict(dampening=0.1)),
     r"unknown gptq setting\(s\) \['dampening'\]: the known ones are"),
    (dict(rounding='gptq', gptq=dict(error_terms='exact')),
     "gptq error_terms 'exact' is unknown"),
    (dict(rounding='gptq', gptq=dict(damp=-1)), 'gptq damp -1 is not a '
     'number in'),
    (dict(rounding='gptq', gptq=dict(stage_size=0)), 'gptq stage_size 0 is '
     'not a positive int'),
])
def test_bad_gptq_settings_are_one_line(kwargs, message):
    with pytest.raises(HawqUserError, match=message):
        DistillSensitivityHook(metric='uniform', bits=4, **kwargs)


@pytest.mark.parametrize('metric', ['uniform', 'outquant'])
def test_one_calibration_set_per_run(tiny_cfg, tmp_path, monkeypatch, metric):
    """The traces, GPTQ's error ratios and GPTQ share one calibration set,
    chosen and preprocessed once per run (twice before, with GPTQ after a
    sensitivity metric); the settings are resolved once, when the hook is
    built."""
    from mmdet_hawq.api import settings as settings_module
    from mmdet_hawq.engine import calibration
    built, resolved = [], []
    build = calibration.build_calibration
    resolve = settings_module.SensitivitySettings.resolved

    def counted(*args, **kwargs):
        built.append(1)
        return build(*args, **kwargs)

    def counted_resolve(*args, **kwargs):
        resolved.append(1)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(calibration, 'build_calibration', counted)
    monkeypatch.setattr(settings_module.SensitivitySettings, 'resolved',
                        counted_resolve)
    kwargs = dict(metric=metric, rounding='gptq', calibration=CAL,
                  sensitivity=SENS)
    kwargs.update(bits=3) if metric == 'uniform' else kwargs.update(
        target_bits=4, bit_range=(3, 6), gptq=dict(error_terms='gptq'))
    _, _, load = run_hook(tiny_cfg, tmp_path, **kwargs)
    assert len(built) == 1 and len(resolved) == 1
    assert load('summary.json')['rounding'] == 'gptq'

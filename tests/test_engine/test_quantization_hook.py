"""The hook inside mmengine's Runner on a tiny DETR built from the real
config; the distillation objective on mmdet's DETR."""
import copy
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import decoder_outputs
from mmdet_hawq.api import check_model
from mmdet_hawq.engine.run import check_run
from mmdet_hawq.quant import load_plan, plan_bits, quantizable_weights
from mmdet_hawq.sensitivity import (DistillationObjective,
                                    gauss_newton_traces, hessian_mode,
                                    hutchinson_traces)


def batches_of(model, cfg, n=2):
    from mmdet_hawq.engine.calibration import build_calibration
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=n * 2, batch_size=2))
    from mmdet_hawq.sensitivity import preprocess_batches
    return preprocess_batches(model, loader)


def test_weight_selection_on_detr(build_tiny_model):
    model = build_tiny_model()
    weights = quantizable_weights(model)
    names = list(weights)
    assert 'backbone.conv1.weight' in names
    assert 'query_embedding.weight' in names
    assert any(n.endswith('attn.attn.in_proj_weight') for n in names)
    assert any(n.endswith('attn.attn.out_proj.weight') for n in names)
    assert not any(n.startswith('bbox_head.') for n in names)
    assert not any('norm' in n or n.endswith('bias') for n in names)


def test_distillation_loss_is_exactly_zero_at_the_float_student(
        build_tiny_model, tiny_cfg):
    model = build_tiny_model()
    teacher = copy.deepcopy(model)
    weights = quantizable_weights(model)
    batches = batches_of(model, tiny_cfg)
    with hessian_mode(model, weights):
        obj = DistillationObjective(model, teacher, batches, weights)
        for i in range(len(batches)):
            loss = obj.loss(i)
            assert loss.item() == 0.0
        cls, box = decoder_outputs(model, batches[0])
    assert cls.shape[0] == 2 and cls.shape[2] == 6  # layers, queries
    assert box.shape[-1] == 4
    # the student's gradient is zero there; the Hessian is not
    with hessian_mode(model, weights):
        res = gauss_newton_traces(weights, obj.gauss_newton_sample,
                                  range(len(batches)), tol=0.0,
                                  max_samples=2)
        hut = hutchinson_traces(weights, obj.loss, range(len(batches)),
                                tol=0.0, max_samples=2)
    assert (res.mean() >= 0).all() and res.mean().max() > 0
    assert torch.isfinite(torch.tensor(hut.samples)).all()
    # requires_grad and mode are restored
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_uniform_hook_packs_and_reloads_identically(tiny_cfg, tmp_path):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.work_dir = str(tmp_path / 'q4')
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform',
                             bits=4)]
    runner = Runner.from_cfg(cfg)
    m4 = runner.test()
    summary = json.load(open(osp.join(cfg.work_dir, 'hawq',
                                      'summary.json')))
    assert summary['avg_bits'] == 4.0
    plan = load_plan(osp.join(cfg.work_dir, 'hawq', 'plan.json'))
    assert set(plan_bits(plan).values()) == {4}
    assert {(e.axis, e.rounding) for e in plan.values()} == {
        (None, 'nearest')}
    quant_state = {k: v.clone() for k, v in runner.model.state_dict().items()}
    # reload the packed file through load_from, no hook: same weights
    cfg2 = copy.deepcopy(tiny_cfg)
    cfg2.work_dir = str(tmp_path / 'reload')
    cfg2.load_from = summary['packed_file']
    cfg2.custom_hooks = []
    runner2 = Runner.from_cfg(cfg2)
    m_reload = runner2.test()
    for k, v in runner2.model.state_dict().items():
        assert torch.equal(v, quant_state[k]), k
    assert m_reload == m4
    fp32_quant_bytes = 4 * sum(
        quant_state[k].numel() for k in plan)
    packed = torch.load(summary['packed_file'], weights_only=False)
    packed_bytes = sum(e['data'].numel() for e in packed['packed'].values())
    assert packed_bytes <= 0.15 * fp32_quant_bytes


def test_hook_rejects_bad_settings():
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    with pytest.raises(HawqUserError, match='from 2 to 8'):
        DistillSensitivityHook(metric='uniform', bits=9)
    with pytest.raises(HawqUserError, match='needs bits'):
        DistillSensitivityHook(metric='uniform')
    with pytest.raises(HawqUserError, match='unknown'):
        DistillSensitivityHook(metric='hessian')
    with pytest.raises(HawqUserError, match='target_bits'):
        DistillSensitivityHook(metric='outquant')
    with pytest.raises(HawqUserError, match='empty'):
        DistillSensitivityHook(metric='outquant', target_bits=4,
                               bit_range=(6, 3))
    with pytest.raises(HawqUserError) as err:
        DistillSensitivityHook(metric='uniform', bits=1)
    assert 'null' not in str(err.value)
    with pytest.raises(HawqUserError) as err:
        DistillSensitivityHook(metric='outquant', target_bits=4,
                               bit_range=(3, 9))
    assert 'bit_range high end' in str(err.value)
    assert 'null' not in str(err.value)


def test_hook_argument_typo_names_the_closest_valid_one():
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    with pytest.raises(HawqUserError) as err:
        DistillSensitivityHook(metric='outquant', target_bit=5)
    msg = str(err.value)
    assert "unknown argument 'target_bit'" in msg
    assert "did you mean 'target_bits'?" in msg
    assert 'bit_range' in msg and 'save_packed' in msg
    assert '\n' not in msg
    with pytest.raises(HawqUserError, match="unknown argument 'zzz'"):
        DistillSensitivityHook(metric='uniform', bits=4, zzz=1)


@pytest.mark.parametrize('target', [2.5, 2, '5'])
def test_infeasible_budget_is_refused_at_construction(target):
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    with pytest.raises(HawqUserError, match='target_bits'):
        DistillSensitivityHook(metric='outquant', target_bits=target,
                               bit_range=(3, 6))
    DistillSensitivityHook(metric='outquant', target_bits=3,
                           bit_range=(3, 6))


def test_non_finite_weight_stops_the_hook(build_tiny_model):
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    model = build_tiny_model()
    name = 'encoder.layers.0.self_attn.attn.in_proj_weight'
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        param[0, 0] = float('nan')
        param[1, 2] = float('inf')
    hook = DistillSensitivityHook(metric='uniform', bits=4)
    with pytest.raises(HawqUserError) as err:
        check_run(hook.settings, model, Config(dict(load_from='ckpt.pth')))
    msg = str(err.value)
    assert f'{name} (2 of {param.numel()} elements)' in msg
    assert "'ckpt.pth'" in msg and 'check the checkpoint' in msg


def test_non_finite_checkpoint_tensor_is_refused(build_tiny_model):
    from mmdet_hawq.engine.checkpoint import prepare_state_dict
    model = build_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['query_embedding.weight'][0, :3] = float('nan')
    with pytest.raises(HawqUserError, match=r"checkpoint 'x\.pth' has "
                       r'NaN/Inf values in 1 tensor\(s\): '
                       r'query_embedding\.weight \(3 of'):
        prepare_state_dict(model, dict(state_dict=state), 'x.pth')


def test_bad_plan_entry_names_the_plan_file(build_tiny_model, tmp_path):
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    model = build_tiny_model()
    plan = {n: 4 for n in quantizable_weights(model)}
    plan[next(iter(plan))] = 12
    path = tmp_path / 'myplan.json'
    path.write_text(json.dumps(plan))
    with pytest.raises(HawqUserError) as err:  # read when built
        DistillSensitivityHook(metric='plan', plan_file=str(path))
    assert 'myplan.json' in str(err.value) and 'or null' in str(err.value)


@pytest.mark.parametrize('metric,estimator,include', [
    ('losssen', 'hutchinson', None), ('outfloat', 'gauss_newton', None),
    ('outquant', 'gauss_newton', None), ('outquant', 'hutchinson', None),
    ('outquant', 'gauss_newton', ['backbone.*', 'encoder.*'])])
def test_every_metric_runs_in_the_runner(tiny_cfg, tmp_path, metric,
                                         estimator, include):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.work_dir = str(tmp_path / metric)
    cfg.custom_hooks = [
        dict(type='DistillSensitivityHook',
             metric=metric,
             target_bits=4,
             include=include,
             bit_range=(3, 6),
             calibration=dict(num_images=4, batch_size=2),
             sensitivity=dict(estimator=estimator,
                              min_samples=2,
                              max_samples=2))
    ]
    runner = Runner.from_cfg(cfg)
    runner.test()
    out = osp.join(cfg.work_dir, 'hawq')
    plan = plan_bits(load_plan(osp.join(out, 'plan.json')))
    layers = json.load(open(osp.join(out, 'layers.json')))
    assert all(3 <= b <= 6 for b in plan.values())
    if include is not None:  # only the included weights are planned
        assert all(n.startswith(('backbone.', 'encoder.')) for n in plan)
    summary = json.load(open(osp.join(out, 'summary.json')))
    assert summary['avg_bits'] <= 4 + 1e-9
    rows = [r for r in layers if r['included']]
    assert all('trace_mean' in r and 'error_by_bits' in r for r in rows)
    assert osp.isfile(osp.join(out, 'traces.png'))
    curve = json.load(open(osp.join(out, 'pareto.json')))
    assert curve[0]['avg_bits'] <= curve[-1]['avg_bits']
    assert curve[0]['perturbation'] >= curve[-1]['perturbation']
    # a second run in the same work dir reuses the cache: same plan
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.test()
    assert plan_bits(load_plan(osp.join(out, 'plan.json'))) == plan


def test_plan_does_not_depend_on_the_thread_count(tiny_cfg, tmp_path):
    """Issue 15 item 7: 1 and 2 intra-op threads sum float32 differently
    (traces ~1e-8 apart); the ILP sees rounded inputs, so the plan is one."""
    threads_before = torch.get_num_threads()
    plans, means = {}, {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cfg = copy.deepcopy(tiny_cfg)
            cfg.work_dir = str(tmp_path / f'threads{threads}')
            cfg.custom_hooks = [dict(
                type='DistillSensitivityHook', metric='outquant',
                target_bits=5, bit_range=(3, 6), save_packed=False,
                calibration=dict(num_images=4, batch_size=2),
                sensitivity=dict(min_samples=3, max_samples=3))]
            runner = Runner.from_cfg(cfg)
            runner.test()
            out = osp.join(cfg.work_dir, 'hawq')
            plans[threads] = json.load(open(osp.join(out, 'plan.json')))
            traces = json.load(open(osp.join(out, 'traces.json')))
            means[threads] = torch.tensor(traces['samples'],
                                          dtype=torch.float64).mean(0)
    finally:
        torch.set_num_threads(threads_before)
    rel = ((means[1] - means[2]).abs() /
           means[1].abs().clamp_min(1e-300)).median().item()
    print(f'median rel. trace difference 1 vs 2 threads: {rel:.3g}')
    assert rel < 1e-4  # float noise only, far below the traces' SE
    assert plans[1] == plans[2]


def test_min_bits_bad_inputs(build_tiny_model):
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    with pytest.raises(HawqUserError, match="metric='uniform' has none"):
        DistillSensitivityHook(metric='uniform', bits=4,
                               min_bits={'backbone.*': 4})
    with pytest.raises(HawqUserError, match=r'int from 3 to 6'):
        DistillSensitivityHook(metric='outquant', target_bits=4,
                               min_bits={'backbone.*': 7})
    with pytest.raises(HawqUserError, match='is not a dict'):
        DistillSensitivityHook(metric='outquant', target_bits=4,
                               min_bits=['backbone.*'])
    model = build_tiny_model()
    hook = DistillSensitivityHook(metric='outquant', target_bits=4,
                                  min_bits={'backbnoe.*': 4})
    with pytest.raises(HawqUserError, match="'backbnoe.*' matches none"):
        check_model(model, hook.settings)
    hook = DistillSensitivityHook(metric='outquant', target_bits=4,
                                  min_bits={'*': 5})
    with pytest.raises(HawqUserError, match='alone average 5.000 bits'):
        check_model(model, hook.settings)


def test_min_bits_bounds_the_plan(tiny_cfg, tmp_path):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.work_dir = str(tmp_path)
    floors = {'backbone.*': 5, 'encoder.*': 4}
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric='outquant', target_bits=4,
        bit_range=(3, 6), min_bits=floors,
        calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2))]
    Runner.from_cfg(cfg).test()
    out = osp.join(cfg.work_dir, 'hawq')
    plan = plan_bits(load_plan(osp.join(out, 'plan.json')))
    assert all(b >= 5 for n, b in plan.items() if n.startswith('backbone.'))
    assert all(b >= 4 for n, b in plan.items() if n.startswith('encoder.'))
    assert min(plan.values()) == 3  # the others pay for it
    assert json.load(open(osp.join(out, 'summary.json')))[
        'avg_bits'] <= 4 + 1e-9


def test_calibration_subset_does_not_use_mmengines_shared_copy_memo(
        tiny_cfg):
    """mmengine 0.10's ``BaseDataset.get_subset`` copies through one deepcopy
    memo kept for the whole process (a mutable default argument): a later
    copy can get back an object of an earlier one whose id was reused, which
    once put a dataset into a pipeline ("'ShapesDataset' object is not
    callable"). The calibration subset must not go through it."""
    from mmengine.dataset import BaseDataset

    from mmdet_hawq.api import QuantSettings
    from mmdet_hawq.engine.calibration import build_calibration
    memo = BaseDataset._copy_without_annotation.__defaults__[0]
    before = len(memo)
    loader, img_ids = build_calibration(tiny_cfg, QuantSettings(
        target_bits=4, calibration=dict(num_images=4)).calibration)
    assert len(memo) == before
    assert len(loader.dataset) == len(img_ids) == 4
    batch = next(iter(loader))
    assert len(batch['inputs']) == 4  # batch_size 4 by default


def faulty_pack(*args, **kwargs):
    """The hook's packing step with a bug (a numpy call on a CUDA tensor)."""
    raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_unexpected_error_in_the_runner_names_its_origin(tiny_cfg, tmp_path,
                                                         monkeypatch):
    """mmengine's call_hook re-raises a hook's TypeError ``from None`` as
    '... in <hook>': the hook reports it with its file, line and traceback
    instead."""
    from mmdet_hawq import report
    from mmdet_hawq.errors import HawqInternalError
    monkeypatch.setattr(report, 'pack_state_dict', faulty_pack)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.work_dir = str(tmp_path)
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform',
                             bits=4)]
    with pytest.raises(HawqInternalError) as err:
        Runner.from_cfg(cfg).test()
    line = faulty_pack.__code__.co_firstlineno + 2
    assert str(err.value) == (
        f'internal error in mmdet-hawq at {__file__}:{line} in faulty_pack: '
        "TypeError: can't convert cuda:0 device type tensor to numpy")
    details = err.value.details
    assert f'File "{__file__}", line {line}, in faulty_pack' in details
    assert 'in before_test' in details and 'in write_run' in details
    assert isinstance(err.value.__cause__, TypeError)


def test_user_error_in_the_runner_is_not_an_internal_error(
        tiny_cfg, tmp_path, monkeypatch):
    from mmdet_hawq import report

    def bad_input(*args, **kwargs):
        raise HawqUserError('the packed file cannot be written')

    monkeypatch.setattr(report, 'pack_state_dict', bad_input)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.work_dir = str(tmp_path)
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform',
                             bits=4)]
    with pytest.raises(HawqUserError, match='^the packed file cannot be '
                       'written$'):
        Runner.from_cfg(cfg).test()

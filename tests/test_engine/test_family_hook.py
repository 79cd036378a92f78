"""Every DETR-family member, shrunk, through the distillation objective and
through ``DistillSensitivityHook`` in mmengine's Runner and mmdet's test
loop."""
import copy
import json
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.models import class_activation, detection_head
from mmdet_hawq.quant import fake_quantize, quantizable_weights
from mmdet_hawq.sensitivity import (DistillationObjective, hessian_mode,
                                    preprocess_batches)
from ..conftest import FAMILY_CONFIGS, build_from

pytestmark = pytest.mark.slow

FAMILIES = sorted(FAMILY_CONFIGS)


def batches_of(model, cfg):
    from mmdet_hawq.engine.calibration import build_calibration
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=4, batch_size=2))
    return preprocess_batches(model, loader)


@pytest.mark.parametrize('name', FAMILIES)
def test_distillation_loss_is_exactly_zero_at_the_float_student(
        family_cfg, name):
    cfg = family_cfg(name)
    model = build_from(cfg)
    teacher = copy.deepcopy(model)
    weights = quantizable_weights(model)
    batches = batches_of(model, cfg)
    with hessian_mode(model, weights):
        obj = DistillationObjective(model, teacher, batches, weights,
                                    activation=class_activation(model))
        for i in range(len(batches)):
            assert obj.loss(i).item() == 0.0
        # away from the teacher it is not
        with torch.no_grad():
            for p in weights.values():
                p.add_(0.01 * torch.randn_like(p))
        assert obj.loss(0).item() > 0


@pytest.mark.parametrize('metric', ['uniform', 'outquant', 'losssen'])
@pytest.mark.parametrize('name', FAMILIES)
def test_family_member_through_the_hook(family_cfg, tmp_path, name, metric):
    cfg = family_cfg(name)
    cfg.work_dir = str(tmp_path)
    hook = dict(type='DistillSensitivityHook', metric=metric)
    if metric == 'uniform':
        hook.update(bits=4)
    else:
        hook.update(target_bits=4,
                    bit_range=(3, 6),
                    calibration=dict(num_images=4, batch_size=2),
                    sensitivity=dict(min_samples=2, max_samples=2))
    cfg.custom_hooks = [hook]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert 'coco/bbox_mAP' in metrics
    out = osp.join(cfg.work_dir, 'hawq')
    plan = {n: e['bits'] for n, e in
            json.load(open(osp.join(out, 'plan.json'))).items()}
    rows = {r['name']: r for r in json.load(open(osp.join(out,
                                                          'layers.json')))}
    summary = json.load(open(osp.join(out, 'summary.json')))
    assert summary['avg_bits'] <= 4 + 1e-9
    # the head's final class/box FFNs stay float, bit for bit
    start = torch.load(cfg.load_from)['state_dict']
    model = runner.model
    prefix = {m: n for n, m in model.named_modules()}[detection_head(model)]
    head_names = {f'{prefix}.{n}' for n, _ in
                  detection_head(model).named_parameters()}
    assert head_names and not head_names & set(plan)
    state = model.state_dict()
    for n in head_names:
        assert torch.equal(state[n], start[n]), n
    # every other weight is planned and fake-quantized as planned
    assert set(plan) == {n for n, r in rows.items() if r['included']}
    for n, b in plan.items():
        assert 3 <= b <= 6
        assert torch.equal(state[n], fake_quantize(start[n], b)), n
    if metric == 'uniform':
        return
    notes = {n: r.get('trace_note', '') for n, r in rows.items()}
    blind = [n for n, t in notes.items() if 'blind spot' in t]
    if cfg.model.get('as_two_stage') and metric == 'outquant':
        # no gradient reaches memory_trans_fc through top-k and detached
        # references, yet it changes the outputs: kept at the top
        assert 'memory_trans_fc.weight' in blind
        assert plan['memory_trans_fc.weight'] == 6
    for n in blind:
        assert plan[n] == 6
    if name in ('conditional', 'dab') and metric == 'outquant':
        # the first decoder layer's content projections see zero queries
        assert any('no influence' in t for n, t in notes.items()
                   if n.startswith('decoder.layers.0.'))


@pytest.mark.parametrize('name', ['dino'])
def test_two_stage_with_proposals_gives_memory_trans_fc_a_trace(
        family_cfg, tmp_path, name):
    """``proposals=True`` distils the encoder proposals over all tokens as
    well, so memory_trans_fc (which feeds only their top-k selection) gets
    a gradient and a trace instead of being a blind spot."""
    cfg = family_cfg(name)
    cfg.work_dir = str(tmp_path)
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric='outquant', target_bits=4,
        bit_range=(3, 6), calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2, proposals=True))]
    Runner.from_cfg(cfg).test()
    out = osp.join(cfg.work_dir, 'hawq')
    rows = {r['name']: r for r in json.load(open(osp.join(out,
                                                          'layers.json')))}
    assert rows['memory_trans_fc.weight']['trace_mean'] > 0
    assert 'blind spot' not in rows['memory_trans_fc.weight']['trace_note']


@pytest.mark.parametrize('name', FAMILIES)
def test_default_floors_cover_every_deformable_attention(family_cfg, name):
    """The structural floors hold the sampling offsets and attention weights
    of every multi-scale deformable attention at 3 bits, and nothing else.
    """
    from mmcv.ops import MultiScaleDeformableAttention

    from mmdet_hawq.models import default_min_bits, detector_family
    from mmdet_hawq.models.adapters import DeformableDETRAdapter
    model = build_from(family_cfg(name))
    expected = {f'{m}.{c}.weight' for m, mod in model.named_modules()
                if isinstance(mod, MultiScaleDeformableAttention)
                for c in ('sampling_offsets', 'attention_weights')}
    floors = default_min_bits(model)
    assert set(floors) == expected and set(floors.values()) <= {3}
    assert bool(expected) == isinstance(detector_family(model),
                                        DeformableDETRAdapter)


def test_default_floors_bound_a_3bit_plan(family_cfg, tmp_path):
    cfg = family_cfg('dino')
    cfg.work_dir = str(tmp_path)
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric='outquant', target_bits=3,
        bit_range=(2, 5), calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2))]
    Runner.from_cfg(cfg).test()
    plan = {n: e['bits'] for n, e in json.load(open(
        osp.join(cfg.work_dir, 'hawq', 'plan.json'))).items()}
    held = [n for n in plan if n.endswith(('sampling_offsets.weight',
                                           'attention_weights.weight'))]
    assert held and all(plan[n] >= 3 for n in held)
    assert min(plan.values()) == 2


@pytest.mark.parametrize('name', FAMILIES)
def test_family_member_rounds_with_gptq_in_the_runner(family_cfg, tmp_path,
                                                      name):
    """GPTQ through the Runner on every family member: before_test comes
    before the test loop's eval(), so GPTQ must put the model in eval mode
    itself (two-stage heads take other inputs in training mode)."""
    cfg = family_cfg(name)
    cfg.work_dir = str(tmp_path)
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform',
                             bits=3, rounding='gptq',
                             calibration=dict(num_images=4, batch_size=2))]
    runner = Runner.from_cfg(cfg)
    assert 'coco/bbox_mAP' in runner.test()
    out = osp.join(cfg.work_dir, 'hawq')
    rows = [r for r in json.load(open(osp.join(out, 'layers.json')))
            if r['included']]
    gptq = [r['name'] for r in rows if r['rounding'] == 'gptq']
    assert len(gptq) >= len(rows) - 3  # embeddings keep nearest
    start = torch.load(cfg.load_from)['state_dict']
    state = runner.model.state_dict()
    assert any(not torch.equal(state[n], fake_quantize(start[n], 3))
               for n in gptq)

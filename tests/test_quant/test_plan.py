import copy
import json

import pytest
import torch
import torch.nn as nn

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (PlanEntry, apply_plan, fake_quantize,
                              gptq_apply, list_weights, load_plan, make_plan,
                              plan_bits, plan_stats, quantizable_weights,
                              save_plan, uniform_plan, validate_plan)


class Head(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc_cls = nn.Linear(8, 3)
        self.reg_ffn = nn.Linear(8, 8)
        self.fc_reg = nn.Linear(8, 4)


class DETR(nn.Module):
    """Named as mmdet's DETR: its family adapter (the head is
    ``bbox_head``) applies to the subclass below."""


class Detector(DETR):

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.attn = nn.MultiheadAttention(8, 2)
        self.query_embedding = nn.Embedding(5, 8)
        self.norm = nn.LayerNorm(8)
        self.bbox_head = Head()


def test_selection_by_module_type_with_the_head_kept_float():
    infos = {i.name: i for i in list_weights(Detector())}
    assert infos['backbone.0.weight'].included
    assert infos['attn.in_proj_weight'].included
    assert infos['attn.out_proj.weight'].included
    assert infos['query_embedding.weight'].included
    for name in ('bbox_head.fc_cls.weight', 'bbox_head.reg_ffn.weight',
                 'bbox_head.fc_reg.weight'):
        assert not infos[name].included
        assert infos[name].reason == 'final class/box FFN of the head (Head)'
    assert not any('norm' in n or 'bias' in n or n.startswith('backbone.1')
                   for n in infos)


def test_include_and_exclude_patterns():
    names = list(quantizable_weights(Detector(), exclude=['attn.*']))
    assert names == ['backbone.0.weight', 'query_embedding.weight']
    names = list(quantizable_weights(Detector(), include=['backbone.*']))
    assert names == ['backbone.0.weight']
    # the head stays float even when a pattern names it
    names = list(quantizable_weights(Detector(), include=['bbox_head.*',
                                                          'backbone.*']))
    assert names == ['backbone.0.weight']
    with pytest.raises(HawqUserError, match="'backbone.9.*'"):
        quantizable_weights(Detector(), exclude=['backbone.9.*'])


def test_apply_plan_in_place_and_stats(tmp_path):
    torch.manual_seed(0)
    model = Detector()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = quantizable_weights(model)
    plan = uniform_plan(weights, 4)
    plan['attn.in_proj_weight'] = PlanEntry(None)
    save_plan(plan, str(tmp_path / 'plan.json'))
    assert load_plan(str(tmp_path / 'plan.json')) == plan
    apply_plan(model, plan)
    after = dict(model.named_parameters())
    assert torch.equal(after['attn.in_proj_weight'],
                       before['attn.in_proj_weight'])
    assert torch.equal(after['backbone.0.weight'],
                       fake_quantize(before['backbone.0.weight'], 4))
    assert torch.equal(after['bbox_head.fc_cls.weight'],
                       before['bbox_head.fc_cls.weight'])
    numels = {n: p.numel() for n, p in weights.items()}
    stats = plan_stats(plan, numels)
    assert stats['avg_bits'] == 4.0
    q = sum(v for n, v in numels.items() if plan[n].bits is not None)
    f = numels['attn.in_proj_weight']
    assert stats['weight_bytes'] == (4 * q + 32 * f) / 8


def test_bad_plans():
    model = Detector()
    weights = quantizable_weights(model)
    full = uniform_plan(weights, 4)
    with pytest.raises(HawqUserError, match='does not have'):
        apply_plan(model, dict(full, nope=PlanEntry(4)))
    with pytest.raises(HawqUserError, match='does not have or does not'):
        validate_plan(dict(full, nope=PlanEntry(4)), weights)
    with pytest.raises(HawqUserError, match='lacks'):
        validate_plan({}, weights)
    with pytest.raises(HawqUserError, match='no calibration batches'):
        apply_plan(model, make_plan(plan_bits(full), rounding='gptq'))


@pytest.mark.parametrize('entry,match', [
    (12, 'bit-width of .backbone.0.weight'),
    (dict(bits=4, axis=1), 'has axis 1'),
    (dict(bits=4, rounding='best'), 'has rounding .best.'),
    (dict(bit=4), 'is not a plan entry'),
])
def test_bad_entries_in_a_plan_file(tmp_path, entry, match):
    path = tmp_path / 'p.json'
    path.write_text(json.dumps({'backbone.0.weight': entry}))
    with pytest.raises(HawqUserError, match=match) as err:
        load_plan(str(path))
    assert "'" + str(path) + "'" in str(err.value)


def test_a_plan_file_of_bits_takes_the_runs_scales_and_rounding(tmp_path):
    """Entries that give only bits (the earlier file format, and what
    people write by hand) get the axis and rounding the caller passes;
    entries with their own keep them."""
    path = tmp_path / 'p.json'
    path.write_text(json.dumps({'a': 4, 'b': None, 'c': dict(
        bits=3, axis=0, rounding='nearest')}))
    plan = load_plan(str(path), axis=0, rounding='gptq')
    assert plan == {'a': PlanEntry(4, 0, 'gptq'),
                    'b': PlanEntry(None, 0, 'gptq'),
                    'c': PlanEntry(3, 0, 'nearest')}


def test_one_apply_plan_rounds_each_entry_as_it_says():
    """Nearest entries get the quantizer's codes, GPTQ entries the codes
    of :func:`gptq_apply` on the same batches, float entries stay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8),
                          nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(32, 16) for _ in range(2)]

    def forward(m, x):
        return m(x)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = {'0.weight': PlanEntry(3, None, 'gptq'),
            '2.weight': PlanEntry(4, 0, 'nearest'),
            '4.weight': PlanEntry(None)}
    result = apply_plan(model, plan, batches, forward)
    assert result.rounding == {'0.weight': 'gptq', '2.weight': 'nearest'}
    after = dict(model.named_parameters())
    assert torch.equal(after['2.weight'],
                       fake_quantize(before['2.weight'], 4, axis=0))
    assert torch.equal(after['4.weight'], before['4.weight'])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[0].weight.copy_(before['0.weight'])
    want = gptq_apply(reference, {'0.weight': 3}, batches, forward)
    assert torch.equal(after['0.weight'], reference[0].weight)
    assert torch.equal(result.applied['0.weight'].codes,
                       want.applied['0.weight'].codes)
    assert not torch.equal(after['0.weight'],
                           fake_quantize(before['0.weight'], 3))


def test_model_without_quantizable_weights():
    with pytest.raises(HawqUserError, match='no quantizable weights'):
        quantizable_weights(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))


def test_temporarily_quantized_restores_bit_for_bit():
    from mmdet_hawq.quant import fake_quantize, temporarily_quantized
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    conv = torch.nn.Conv2d(2, 3, 3)
    weights = {'lin': lin.weight, 'conv': conv.weight}
    before = {n: p.detach().clone() for n, p in weights.items()}
    with temporarily_quantized(weights, make_plan({'lin': 3, 'conv': None})):
        assert torch.equal(lin.weight, fake_quantize(before['lin'], 3))
        assert torch.equal(conv.weight, before['conv'])
    assert all(torch.equal(weights[n], before[n]) for n in weights)
    with pytest.raises(RuntimeError, match='inside'):
        with temporarily_quantized(weights, make_plan({'lin': 2}, axis=0)):
            assert torch.equal(lin.weight,
                               fake_quantize(before['lin'], 2, axis=0))
            raise RuntimeError('inside')
    assert all(torch.equal(weights[n], before[n]) for n in weights)

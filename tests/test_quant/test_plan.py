import json

import pytest
import torch
import torch.nn as nn

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (apply_plan, fake_quantize, list_weights,
                              load_plan, plan_stats, quantizable_weights,
                              save_plan, uniform_plan)


class Head(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc_cls = nn.Linear(8, 3)
        self.reg_ffn = nn.Linear(8, 8)
        self.fc_reg = nn.Linear(8, 4)


class Detector(nn.Module):

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
    plan['attn.in_proj_weight'] = None
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
    q = sum(v for n, v in numels.items() if plan[n] is not None)
    f = numels['attn.in_proj_weight']
    assert stats['weight_bytes'] == (4 * q + 32 * f) / 8
    json.dumps(plan)


@pytest.mark.parametrize('plan,match', [
    ({'nope': 4}, 'does not have'),
    ({}, 'lacks'),
])
def test_bad_plans(plan, match):
    model = Detector()
    full = uniform_plan(quantizable_weights(model), 4)
    with pytest.raises(HawqUserError, match=match):
        apply_plan(model, dict(full, **plan) if 'nope' in plan else plan)


def test_bad_bits_in_plan():
    model = Detector()
    plan = uniform_plan(quantizable_weights(model), 4)
    plan['backbone.0.weight'] = 12
    with pytest.raises(HawqUserError, match="'backbone.0.weight'"):
        apply_plan(model, plan)


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
    with temporarily_quantized(weights, {'lin': 3, 'conv': None}):
        assert torch.equal(lin.weight, fake_quantize(before['lin'], 3))
        assert torch.equal(conv.weight, before['conv'])
    assert all(torch.equal(weights[n], before[n]) for n in weights)
    with pytest.raises(RuntimeError, match='inside'):
        with temporarily_quantized(weights, {'lin': 2}, axis=0):
            assert torch.equal(lin.weight,
                               fake_quantize(before['lin'], 2, axis=0))
            raise RuntimeError('inside')
    assert all(torch.equal(weights[n], before[n]) for n in weights)

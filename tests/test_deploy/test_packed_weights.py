"""load_packed(keep_packed=True): weights stay packed codes + scale on the
modules, are dequantized when read, and the detections are bit-identical to
the fake-quantized model's."""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.runner import Runner

from mmdet_hawq.deploy import PackedWeight, load_packed, module_weight_bytes
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (fake_quantize, plan_bits, quantizable_weights,
                              uniform_plan)

from .conftest import make_packed


def test_assigning_a_weight_quantizes_it():
    """right_inverse: ``module.weight = W`` stores Q(W)'s codes."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).requires_grad_(False)  # uint8 originals
    first = lin.weight.detach().clone()
    nn.utils.parametrize.register_parametrization(
        lin, 'weight', PackedWeight(3, (3, 5)))
    assert torch.equal(lin.weight, fake_quantize(first, 3))
    new = torch.randn(3, 5)
    lin.weight = new
    assert torch.equal(lin.weight, fake_quantize(new, 3))


def predict(model: nn.Module, cfg: Config) -> list:
    """mmdet's test step on the tiny val images (batch 4)."""
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    out = []
    with torch.no_grad():
        for batch in loader:
            out += model.test_step(batch)
    return out


def build(cfg: Config) -> nn.Module:
    from mmdet.registry import MODELS
    return MODELS.build(copy.deepcopy(cfg.model))


@pytest.mark.parametrize('axis', [None, 0])
def test_keep_packed_detections_bit_identical(tiny_cfg, tiny_packed, axis):
    made = tiny_packed if axis is None else make_packed(tiny_cfg, axis=axis)
    packed = made['packed']
    fake = load_packed(build(tiny_cfg), packed, keep_packed=False)
    kept = load_packed(build(tiny_cfg), packed, keep_packed=True)
    params = dict(kept.named_parameters())
    for name, entry in packed['packed'].items():
        assert name not in params  # no fp32 copy is held
        prefix, _, attr = name.rpartition('.')
        owner = kept.get_submodule(prefix)
        data, scale = (owner.parametrizations[attr].original0,
                       owner.parametrizations[attr].original1)
        numel = int(torch.tensor(entry['shape']).prod())
        assert data.dtype == torch.uint8
        assert data.shape == (entry['bits'], -(-numel // 8))
        assert scale.dtype == torch.float32
        assert torch.equal(getattr(owner, attr),
                           dict(fake.named_parameters())[name])
    ours, ref = predict(kept, tiny_cfg), predict(fake, tiny_cfg)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        for key in ('scores', 'labels', 'bboxes'):
            assert torch.equal(a.pred_instances[key], b.pred_instances[key])
    sizes, fp32 = module_weight_bytes(kept), module_weight_bytes(fake)
    codes = sum(-(-e['data'].numel() // e['bits']) * e['bits']
                for e in packed['packed'].values())
    scales = sum(e['scale'].numel() * 4 for e in packed['packed'].values())
    assert codes <= sizes['packed'] - scales <= codes + 8 * len(
        packed['packed'])
    assert sizes['buffers'] == fp32['buffers']
    assert sizes['total'] < fp32['total'] / 2


def test_keep_packed_uniform_2bit(tiny_cfg):
    made = make_packed(tiny_cfg, plan_fn=lambda m: plan_bits(uniform_plan(
        quantizable_weights(m), 2)))
    fake = load_packed(build(tiny_cfg), made['packed'], keep_packed=False)
    kept = load_packed(build(tiny_cfg), made['packed'])
    for a, b in zip(predict(kept, tiny_cfg), predict(fake, tiny_cfg)):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
    codes = sum(e['data'].numel() for e in made['packed']['packed'].values())
    assert module_weight_bytes(kept)['packed'] < codes + 8 * 4 * len(
        made['packed']['packed'])


def test_load_packed_bad_inputs(tiny_cfg, tiny_packed):
    with pytest.raises(HawqUserError, match='not a packed'):
        load_packed(build(tiny_cfg), dict(state_dict={}, meta={}))
    broken = copy.deepcopy(tiny_packed['packed'])
    name = next(iter(broken['packed']))
    broken['packed']['no.such.weight'] = broken['packed'].pop(name)
    with pytest.raises(HawqUserError, match='does not fit the model'):
        load_packed(build(tiny_cfg), broken, source='x.pth')


class Attention(nn.Module):
    """Attention at the small DETR's width, on the permuted feature map
    DETR's encoder gets (a non-contiguous 3-D input)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(128, 8)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = (x + pos).transpose(0, 1)  # (N, B, C) views, as mmcv passes
        return self.attn(q, (x + pos).transpose(0, 1), x.transpose(0, 1))[0]


def test_dequantized_weight_keeps_the_kernels_of_a_parameter():
    """ATen's matmul folds a 3-D input into one mm or not by the weight's
    requires_grad; the two round differently. The packed weight carries the
    replaced parameter's flag, so the outputs stay bit-identical."""
    from mmdet_hawq.quant import apply_plan, make_plan, pack_state_dict
    torch.manual_seed(0)
    model = Attention().eval()
    plan = make_plan({'attn.in_proj_weight': 4, 'attn.out_proj.weight': 4})
    packed = pack_state_dict(model, apply_plan(model, plan).applied, plan)
    kept = load_packed(Attention(), packed)
    # (B, C, H*W) permuted to (B, H*W, C), as DETR's pre_transformer does
    x = torch.randn(1, 128, 64).permute(0, 2, 1)
    pos = torch.randn(1, 128, 64).permute(0, 2, 1)
    with torch.no_grad():
        assert torch.equal(kept(x, pos), model(x, pos))

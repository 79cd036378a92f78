import pytest
import torch
import torch.nn as nn

from mmdet_hawq.quant.packing import (is_packed, pack_codes, pack_state_dict,
                                      unpack_checkpoint, unpack_codes)
from mmdet_hawq.quant.plan import apply_plan, uniform_plan
from mmdet_hawq.quant.quantizer import quantize_weight
from mmdet_hawq.quant.selection import quantizable_weights


@pytest.mark.parametrize('bits', range(2, 9))
@pytest.mark.parametrize('numel', [1, 7, 64, 1001])
def test_pack_roundtrip_and_size(bits, numel):
    codes = quantize_weight(torch.randn(numel), bits).codes
    data = pack_codes(codes, bits)
    assert data.dtype == torch.uint8
    assert data.numel() == (numel * bits + 7) // 8
    assert torch.equal(unpack_codes(data, bits, numel), codes)


class Tiny(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)


def test_packed_checkpoint_restores_bit_identical_weights():
    torch.manual_seed(0)
    model = Tiny()
    names = list(quantizable_weights(model))
    plan = uniform_plan(names, 4)
    plan['fc.weight'] = 6
    plan['conv.weight'] = None
    quantized = apply_plan(model, plan)
    packed = pack_state_dict(model, quantized, plan)
    assert is_packed(packed)
    assert 'conv.weight' in packed['state_dict']
    assert packed['packed']['fc.weight']['bits'] == 6
    restored = Tiny()
    restored.load_state_dict(unpack_checkpoint(packed)['state_dict'],
                             strict=True)
    for (name, a), b in zip(model.state_dict().items(),
                            restored.state_dict().values()):
        assert torch.equal(a, b), name

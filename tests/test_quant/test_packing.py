import numpy as np
import pytest
import torch
import torch.nn as nn

from mmdet_hawq.quant import packing
from mmdet_hawq.quant.packing import (is_packed, pack_codes, pack_planes,
                                      pack_state_dict, pad_packed_codes,
                                      unpack_checkpoint, unpack_codes,
                                      unpack_planes)
from mmdet_hawq.quant.plan import PlanEntry, apply_plan, uniform_plan
from mmdet_hawq.quant.quantizer import quantize_weight
from mmdet_hawq.quant.selection import quantizable_weights


def stream(codes: torch.Tensor, bits: int) -> np.ndarray:
    """The format written out: unsigned code ``i`` = ``c + 2^(bits-1) - 1``
    in bits ``[i*bits, (i+1)*bits)`` of a little-endian bit stream."""
    u = codes.numpy().astype(np.int64) + 2**(bits - 1) - 1
    planes = (u[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.reshape(-1).astype(np.uint8),
                       bitorder='little')


@pytest.mark.parametrize('bits', range(2, 9))
@pytest.mark.parametrize('numel', [1, 7, 8, 9, 64, 1001])
def test_pack_codes_writes_the_stream_and_unpacks_it(bits, numel):
    codes = quantize_weight(torch.randn(numel), bits).codes
    data = pack_codes(codes, bits)
    assert data.dtype == torch.uint8
    assert data.numel() == (numel * bits + 7) // 8
    assert np.array_equal(data.numpy(), stream(codes, bits))
    assert torch.equal(unpack_codes(data, bits, numel), codes)


@pytest.mark.parametrize('small', [True, False])
@pytest.mark.parametrize('bits', range(2, 9))
def test_both_unpacking_paths_read_the_planes(bits, small, monkeypatch):
    # few ops for small weights, code by code for large ones
    monkeypatch.setattr(packing, '_SMALL', 1 << 30 if small else 0)
    for numel in (1, 7, 8, 9, 1001):
        codes = quantize_weight(torch.randn(numel), bits).codes
        planes = pad_packed_codes(torch.from_numpy(stream(codes, bits)),
                                  bits, numel)
        assert planes.shape == (bits, -(-numel // 8))
        unsigned = codes.reshape(-1).to(torch.int64) + 2**(bits - 1) - 1
        assert torch.equal(pack_planes(unsigned, bits), planes)
        out = unpack_planes(planes, bits, numel)
        assert out.dtype == torch.int8 and torch.equal(out, codes)


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
    plan['fc.weight'] = PlanEntry(6)
    plan['conv.weight'] = PlanEntry(None)
    quantized = apply_plan(model, plan).applied
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

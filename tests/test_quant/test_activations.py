"""Activation quantization (quant/activations.py): the quantizer against its
formula written out, the calibrated ranges, and the sites' hooks."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant.activations import (ActivationRange, activation_modules,
                                          conv_output_modules,
                                          calibrate_range, observe_sites,
                                          quantized_activations)


@pytest.mark.parametrize('lo,hi,bits', [(-1.5, 3.0, 8), (0.0, 2.0, 8),
                                        (-0.25, 0.0, 4)])
def test_fake_quantize_is_its_formula(lo, hi, bits):
    x = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    got = ActivationRange(lo, hi, bits).fake_quantize(x).numpy()
    levels = 2**bits - 1
    s = (hi - lo) / levels
    z = np.round(-lo / s)
    want = (np.clip(np.round(x.numpy() / s) + z, 0, levels) - z) * s
    np.testing.assert_array_equal(got, want)
    assert ActivationRange(lo, hi, bits).fake_quantize(
        torch.zeros(3, dtype=torch.float64)).eq(0).all()  # 0 is exact


def _observed(values):
    sites = {'lin': nn.Identity()}
    with observe_sites(sites) as seen:
        for chunk in values.split(1000):
            sites['lin'](chunk)
    return seen['lin']


def test_ranges_minmax_percentile_and_mse():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(20000), torch.tensor([40.0, -30.0])])
    obs = _observed(values)
    minmax = calibrate_range(obs, 'minmax')
    assert (minmax.lo, minmax.hi) == (-30.0, 40.0)
    pct = calibrate_range(obs, 'percentile')
    assert -6 < pct.lo < -2 and 2 < pct.hi < 6  # the outliers clipped
    mse = calibrate_range(obs, 'mse')

    def err(r):
        return float(((r.fake_quantize(values) - values)**2).mean())

    assert err(mse) < err(minmax)
    with pytest.raises(HawqUserError, match="method 'best' is unknown"):
        calibrate_range(obs, 'best')


class Block(nn.Module):

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x + 1, x)[0])


def test_sites_hooks_quantize_the_inputs_and_go_away():
    torch.manual_seed(0)
    block = Block().eval()
    sites = activation_modules(block, ['attn.in_proj_weight', 'fc.weight'])
    assert set(sites) == {'attn', 'fc'}
    x = torch.randn(5, 3, 8)
    with observe_sites(sites) as seen:
        block(x)
    assert set(seen) == {'attn:query', 'attn:key', 'attn:value', 'fc'}
    ranges = {n: calibrate_range(o, 'minmax') for n, o in seen.items()}
    assert ranges['attn:key'].hi > ranges['attn:query'].hi  # x + 1
    with torch.no_grad():
        with quantized_activations(sites, ranges):
            got = block(x)
        q = {n: r.fake_quantize for n, r in ranges.items()}
        h = block.attn(q['attn:query'](x), q['attn:key'](x + 1),
                       q['attn:value'](x))[0]
        want = block.fc(q['fc'](h))
        assert torch.equal(got, want)
        assert torch.equal(block(x), block.fc(block.attn(x, x + 1, x)[0]))


class ConvNet(nn.Module):
    """conv1 → bn1 → ReLU → conv2 (no norm) → + conv1's branch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        return self.conv2(a) + a


def test_conv_outputs_are_taken_after_their_batch_norm():
    """A convolution's output site is its BatchNorm's output where one
    normalizes it (the export folds that BN into the integer kernel), else
    its own; the output quantizer is the formula on that tensor."""
    torch.manual_seed(0)
    net = ConvNet().eval()
    net.bn1.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    sites = activation_modules(net, ['conv1.weight', 'conv2.weight'])
    where = conv_output_modules(net, ['conv1', 'conv2'], lambda: net(x))
    assert where == {'conv1': 'bn1', 'conv2': 'conv2'}
    outputs = {'bn1': net.bn1, 'conv2': net.conv2}
    with observe_sites(sites, outputs) as seen:
        net(x)
    assert set(seen) == {'conv1', 'conv2', 'bn1:output', 'conv2:output'}
    ranges = {n: calibrate_range(o, 'minmax') for n, o in seen.items()}
    with torch.no_grad():
        with quantized_activations({**sites, **outputs}, ranges):
            got = net(x)
        q = {n: r.fake_quantize for n, r in ranges.items()}
        a = torch.relu(q['bn1:output'](net.bn1(net.conv1(q['conv1'](x)))))
        want = q['conv2:output'](net.conv2(q['conv2'](a))) + a
    assert torch.equal(got, want)

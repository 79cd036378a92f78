"""What the activation observer keeps (quant/activations.py::observe_sites)
against an independent snapshot, on sites whose tensors the forward rewrites
in place after the hook: ``ReLU(inplace=True)`` after a BatchNorm, the
residual ``+=``, and in-place ``mul_``/``add_`` on an attention's input (as
mmdet's backbones, necks and transformers do).

The observer used to keep views of the live tensors (on the CPU ``.detach()``,
``.reshape()``, ``.float()``, a slice and ``.cpu()`` copy nothing), so its
percentile and MSE ranges were computed from values rewritten after it:
every site before an in-place ReLU got a range starting at exactly 0, and
the small DETR lost 15 mAP with percentile ranges (issue 28). The snapshot
here clones the whole tensor in a hook of its own; the ranges of every
method must equal those computed from it.
"""
import math

import pytest
import torch
import torch.nn as nn

from mmdet_hawq.quant.activations import (RANGE_METHODS, _Observer,
                                          activation_modules,
                                          calibrate_range,
                                          conv_output_modules, observe_sites)


class InPlaceNet(nn.Module):
    """Sites followed by each in-place operation: a BatchNorm output read by
    ``ReLU(inplace=True)``, one by a residual ``+=`` (then the in-place
    ReLU), and a linear layer's input scaled and shifted in place after the
    layer read it (``mul_``, ``add_``, as attention code does to a query)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, H·W, H·W) attention logits."""
        x = self.relu(self.bn1(self.conv1(image)))
        out = self.bn2(self.conv2(x))
        out += x  # residual, in place
        out = self.relu(out)
        tokens = out.flatten(2).transpose(1, 2).contiguous()  # (B, HW, 8)
        q = self.query(tokens)
        tokens.mul_(0.5)  # the input the query read, rewritten in place
        tokens.add_(1.0)
        k = self.key(tokens)
        return q @ k.transpose(1, 2)


def _sites(model):
    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    sites = activation_modules(model, weights)
    convs = [n for n, m in sites.items() if isinstance(m, nn.Conv2d)]
    return sites, convs


def _snapshot(sites, outputs, run):
    """Observers fed, after the forwards, from whole clones taken by hooks
    of their own."""
    clones = {}

    def pre(name):
        def hook(module, args):
            clones.setdefault(name, []).append(args[0].detach().clone())
        return hook

    def post(name):
        def hook(module, args, out):
            clones.setdefault(name + ':output', []).append(
                out.detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in sites.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in outputs.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    observers = {}
    for site, tensors in clones.items():
        obs = observers[site] = _Observer()
        for t in tensors:
            obs.add(t)
    return observers


def _observed_and_snapshot(model, batches):
    sites, convs = _sites(model)
    modules = dict(model.named_modules())
    where = conv_output_modules(model, convs, lambda: model(batches[0]))
    outputs = {n: modules[n] for n in where.values()}

    def run():
        for b in batches:
            model(b)

    # both hooks run before the forward goes on and rewrites the tensor
    with observe_sites(sites, outputs) as seen:
        snap = _snapshot(sites, outputs, run)
    return seen, snap, where


@pytest.mark.parametrize('method', RANGE_METHODS)
def test_every_range_method_equals_an_independent_snapshot(method):
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    for bn in (model.bn1, model.bn2):  # outputs of both signs
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.uniform_(-0.5, 0.5)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    seen, snap, where = _observed_and_snapshot(model, batches)
    assert where == {'conv1': 'bn1', 'conv2': 'bn2'}
    assert set(seen) == set(snap) == {
        'conv1', 'conv2', 'query', 'key', 'bn1:output', 'bn2:output'}
    for site in seen:
        kept = torch.cat(seen[site].samples)
        assert torch.equal(kept, torch.cat(snap[site].samples)), site
        got = calibrate_range(seen[site], method)
        want = calibrate_range(snap[site], method)
        assert (got.lo, got.hi) == (want.lo, want.hi), (site, method)
    # the sites read before an in-place ReLU hold negative values
    assert calibrate_range(seen['bn1:output'], method).lo < 0
    assert calibrate_range(seen['bn2:output'], method).lo < 0


def test_mmdet_resnet_ranges_equal_the_snapshot():
    """mmdet's own ResNet (in-place ReLU, ``out += identity``)."""
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    model = ResNet(depth=18, num_stages=2, strides=(1, 2), dilations=(1, 1),
                   out_indices=(1, ))
    model.eval()  # mmdet's ResNet.train returns None
    batches = [torch.randn(1, 3, 32, 32) for _ in range(2)]
    seen, snap, where = _observed_and_snapshot(model, batches)
    assert where['layer1.0.conv2'] == 'layer1.0.bn2'
    for site in seen:
        for method in RANGE_METHODS:
            got = calibrate_range(seen[site], method)
            want = calibrate_range(snap[site], method)
            assert math.isclose(got.lo, want.lo, abs_tol=0) and \
                math.isclose(got.hi, want.hi, abs_tol=0), (site, method)
    # a block's last BatchNorm output is added to the identity before the
    # ReLU: its range keeps its negative side
    assert calibrate_range(seen['layer1.0.bn2:output'], 'percentile').lo < 0

"""Gather-based multi-scale deformable attention against mmcv's
``grid_sample`` path (values, gradients, Hessian-vector products, on the CPU
and on CUDA), and a Hutchinson trace of the small DINO through either."""
import pytest
import torch
from mmcv.ops import multi_scale_deform_attn as msda

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.models import bilinear as bilinear_module
from mmdet_hawq.sensitivity import hutchinson_traces
from mmdet_hawq.models.bilinear import \
    multi_scale_deformable_attn_bilinear as bilinear
from ..conftest import build_from, requires_cuda

grid_sample_path = msda.multi_scale_deformable_attn_pytorch
F64 = torch.float64
DEVICES = ['cpu', pytest.param('cuda', marks=[pytest.mark.cuda,
                                              requires_cuda])]
#: (H, W) of the levels: a 1×1 map, and widths that are powers of two, so
#: that the pixel borders k/W below are exact
SHAPES = [[4, 8], [3, 4], [2, 2], [1, 1]]
HEADS, DIMS, QUERIES, POINTS = 2, 3, 7, 4


def attention_inputs(device, borders: bool):
    """value (2, N, heads, d), spatial shapes (L, 2), locations (2, Q,
    heads, L, P, 2) in [-0.3, 1.3] and weights (2, Q, heads, L, P), float64
    on ``device``. With ``borders``, queries 0–3 sample exactly on pixel
    borders, pixel centres (where the interpolation has kinks) and the
    maps' own edges."""
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(SHAPES)
    n, levels = int(shapes.prod(1).sum()), len(SHAPES)
    value = torch.randn(2, n, HEADS, DIMS, generator=gen, dtype=F64)
    loc = torch.rand(2, QUERIES, HEADS, levels, POINTS, 2, generator=gen,
                     dtype=F64) * 1.6 - 0.3
    weights = torch.rand(2, QUERIES, HEADS, levels, POINTS, generator=gen,
                         dtype=F64)
    if borders:
        k = torch.arange(POINTS, dtype=F64)
        size = shapes.to(F64)  # (L, 2): H, W
        loc[:, 0, ..., 0] = k / size[:, 1:]  # pixel borders in x
        loc[:, 1, ..., 0] = (k + 0.5) / size[:, 1:]  # pixel centres in x
        loc[:, 2, ..., 1] = k / size[:, :1]  # pixel borders in y
        loc[:, 3, :, :, :2] = torch.tensor([[0.0, 0.0], [1.0, 1.0]],
                                           dtype=F64)  # the maps' corners
    return [t.to(device) for t in (value, shapes, loc, weights)]


@pytest.mark.parametrize('device', DEVICES)
def test_value_and_gradients_match_grid_sample(device):
    value, shapes, loc, weights = attention_inputs(device, borders=True)
    grad_out = torch.randn(2, QUERIES, HEADS * DIMS, dtype=F64,
                           generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (bilinear, grid_sample_path):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        grads = torch.autograd.grad((out * grad_out.to(device)).sum(),
                                    inputs)
        results.append((out, *grads))
    for name, new, ref in zip(('output', 'value', 'locations', 'weights'),
                              *results):
        assert new.shape == ref.shape and new.device == ref.device, name
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12,
                                   msg=name)


def loss_and_hvp(fn, inputs, shapes, direction):
    """``f = Σ tanh(out)²`` through ``fn``; returns ``∇f`` and ``H·d``."""
    out = fn(inputs[0], shapes, inputs[1], inputs[2])
    grads = torch.autograd.grad(torch.tanh(out).pow(2).sum(), inputs,
                                create_graph=True)
    dot = sum((g * d).sum() for g, d in zip(grads, direction))
    return grads, torch.autograd.grad(dot, inputs)


def random_direction(tensors):
    """A fixed random direction, one tensor like each of ``tensors``."""
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            for t in tensors]


@pytest.mark.parametrize('device', DEVICES)
def test_hessian_vector_product_matches_finite_differences(device):
    value, shapes, loc, weights = attention_inputs(device, borders=False)
    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    direction = random_direction(inputs)
    _, hvp = loss_and_hvp(bilinear, inputs, shapes, direction)

    def grad_at(step):
        moved = [(t + step * d).detach().requires_grad_()
                 for t, d in zip(inputs, direction)]
        return loss_and_hvp(bilinear, moved, shapes, direction)[0]

    eps = 1e-6
    for name, h, plus, minus in zip(('value', 'locations', 'weights'), hvp,
                                    grad_at(eps), grad_at(-eps)):
        fd = (plus - minus) / (2 * eps)
        assert fd.abs().max() > 0, name
        torch.testing.assert_close(h, fd, rtol=1e-5,
                                   atol=1e-7 * fd.abs().max().item(),
                                   msg=name)


def test_hessian_vector_product_matches_grid_sample_on_the_cpu():
    # mmcv's path has double backward on the CPU in this PyTorch
    value, shapes, loc, weights = attention_inputs('cpu', borders=True)
    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    direction = random_direction(inputs)
    _, new = loss_and_hvp(bilinear, inputs, shapes, direction)
    _, ref = loss_and_hvp(grid_sample_path, inputs, shapes, direction)
    for name, a, b in zip(('value', 'locations', 'weights'), new, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.cuda
@requires_cuda
def test_double_backward_on_cuda_where_grid_sample_has_none():
    results = []
    for device in ('cpu', 'cuda'):
        value, shapes, loc, weights = attention_inputs(device, borders=False)
        inputs = [t.requires_grad_() for t in (value, loc, weights)]
        direction = random_direction(inputs)
        results.append(loss_and_hvp(bilinear, inputs, shapes, direction)[1])
    for a, b in zip(*results):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-10)
    inputs = [t.detach().requires_grad_() for t in inputs]
    try:  # grid_sample has no double backward in many PyTorch versions
        _, ref = loss_and_hvp(grid_sample_path, inputs, shapes, direction)
    except RuntimeError as error:
        assert 'grid_sampler_2d_backward is not implemented' in str(error)
    else:  # where it has one, both agree
        for a, b in zip(results[1], ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_hutchinson_traces_of_the_small_dino_match_grid_sample(
        family_cfg, monkeypatch):
    from mmcv.ops import MultiScaleDeformableAttention

    from mmdet_hawq.engine.calibration import build_calibration
    from mmdet_hawq.quant import quantizable_weights
    from mmdet_hawq.sensitivity import (DetrLossObjective, hessian_mode,
                                        preprocess_batches)
    cfg = family_cfg('dino')
    model = build_from(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off mmcv's zero init: samples off the lattice
        for m in model.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                for lin in (m.sampling_offsets, m.attention_weights):
                    lin.weight.normal_(0, 0.02, generator=gen)
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=2, batch_size=2))
    batches = preprocess_batches(model, loader)
    weights = quantizable_weights(model)
    calls = {}

    def traces(name, fn):
        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)

        # what the deformable family's double-backward swap installs
        monkeypatch.setattr(bilinear_module,
                            'multi_scale_deformable_attn_bilinear', counted)
        with hessian_mode(model, weights):
            obj = DetrLossObjective(model, batches, training_flag=True)
            res = hutchinson_traces(weights, obj.loss, range(len(batches)),
                                    tol=0.0, min_samples=2, max_samples=2,
                                    seed=0)
        return torch.as_tensor(res.mean())

    new = traces('bilinear', bilinear)
    ref = traces('grid_sample', grid_sample_path)
    assert calls['bilinear'] == calls['grid_sample'] > 0
    names = list(weights)
    msda_layers = [i for i, n in enumerate(names)
                   if 'sampling_offsets' in n]
    assert msda_layers and (new[msda_layers] != 0).all()
    scale = new.abs().max().item()
    torch.testing.assert_close(new, ref, rtol=1e-3, atol=1e-5 * scale)

"""Sigmoid-head distillation against exact Hessians; second order through
mmcv's multi-scale deformable attention against finite differences."""
import copy

import pytest
import torch
from torch.func import functional_call

from mmdet_hawq.models.adapters.deformable_detr import \
    pytorch_deformable_attention
from mmdet_hawq.sensitivity import (batch_hvp, gauss_newton_traces,
                                    hutchinson_traces, sigmoid_fisher_draw,
                                    temperature_kl)
from .test_estimators import (LAM, T, check, exact_gauss_newton,
                              exact_traces, make, targets)


def test_sigmoid_kl_is_zero_at_equality_with_hessian_p1mp_over_t2():
    torch.manual_seed(0)
    z = torch.randn(3, 5, dtype=torch.float64) * 3
    assert temperature_kl(z, z.clone(), T, 'sigmoid').item() == 0.0
    H = torch.autograd.functional.hessian(
        lambda s: temperature_kl(s, z, T, 'sigmoid'), z.clone())
    p = torch.sigmoid(z / T).reshape(-1)
    expected = torch.diag(p * (1 - p) / T**2)
    assert torch.allclose(H.reshape(15, 15), expected, atol=1e-12)
    # and the KL is positive away from equality
    assert temperature_kl(z + 0.3, z, T, 'sigmoid').item() > 0


def test_sigmoid_draw_has_the_output_hessian_as_second_moment():
    z = torch.tensor([[-4.0, 0.0, 2.5]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    u = torch.stack([sigmoid_fisher_draw(z, T, LAM, gen)
                     for _ in range(4000)])
    p = torch.sigmoid(z / T)
    # E[u uᵀ] = λ diag(p(1-p)) / T²: the diagonal is exact per draw, the
    # off-diagonal vanishes in expectation
    assert torch.allclose(u.pow(2), (LAM * p * (1 - p) / T**2).expand_as(u))
    cross = (u[..., 0] * u[..., 2]).mean().abs().item()
    assert cross < 4 * (LAM * 0.25 / T**2) / 4000**0.5


def sigmoid_distill(model, teacher, xs, n_total):

    t_out = [teacher(x).detach() for x in xs]

    def loss(i, params=None):
        out = model(xs[i]) if params is None else functional_call(
            model, params, (xs[i], ))
        return LAM * temperature_kl(out, t_out[i], T, 'sigmoid') / n_total

    return loss


def sigmoid_output_hessian(z):
    """diag(p(1-p)) at the student's sigmoid, (rows, C, C)."""
    p = torch.sigmoid(z / T).reshape(-1, z.shape[-1])
    return torch.diag_embed(p * (1 - p))


@pytest.mark.parametrize('arch', ['mlp', 'attn'])
def test_sigmoid_gauss_newton_matches_the_exact_hessian(arch):
    model, xs = make(arch)
    teacher = copy.deepcopy(model)
    n_total = sum(x[..., 0].numel() for x in xs)
    names = list(targets(model))

    def sample(i, gen):
        z = model(xs[i])
        u = sigmoid_fisher_draw(z, T, LAM / n_total, gen)
        return (u * z).sum()

    res = gauss_newton_traces(targets(model), sample, range(len(xs)),
                              tol=0.0, max_samples=200, seed=5)
    gn = exact_gauss_newton(model, xs, names, n_total,
                            sigmoid_output_hessian)
    check(res, gn)
    # at the float student the residual is 0: Gauss-Newton = Hessian
    loss_fn = sigmoid_distill(model, teacher, xs, n_total)
    exact = exact_traces(model, loss_fn, len(xs), names)
    for n in names:
        assert gn[n] == pytest.approx(exact[n], rel=1e-6, abs=1e-12)
    # and the Hutchinson estimator of the same loss agrees too
    hut = hutchinson_traces(targets(model), loss_fn, range(len(xs)),
                            tol=0.0, max_samples=60, seed=3)
    check(hut, exact)


def deformable_block():
    from mmcv.ops import MultiScaleDeformableAttention
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(
        embed_dims=8, num_heads=2, num_levels=2, num_points=2,
        batch_first=True).double().eval()
    with torch.no_grad():  # non-trivial offsets (mmcv's init is a grid)
        attn.sampling_offsets.weight.normal_(0, 0.3)
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    value = torch.randn(2, 20, 8, dtype=torch.float64)
    query = torch.randn(2, 3, 8, dtype=torch.float64)
    ref = torch.rand(2, 3, 2, 2, dtype=torch.float64) * 0.8 + 0.1

    def loss(_batch=None):
        out = attn(query, value=value, reference_points=ref,
                   spatial_shapes=shapes, level_start_index=start)
        return torch.tanh(out).pow(2).sum()

    params = {n: p for n, p in attn.named_parameters()
              if n.endswith('weight')}
    return attn, params, loss


def test_deformable_attention_hvp_matches_finite_differences():
    _, params, loss = deformable_block()
    names = list(params)
    plist = [params[n] for n in names]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in plist]
    hv = batch_hvp(plist, loss, None, v, names)

    def grad_at(step):
        with torch.no_grad():
            for p, d in zip(plist, v):
                p.add_(step * d)
        g = torch.autograd.grad(loss(), plist)
        with torch.no_grad():
            for p, d in zip(plist, v):
                p.sub_(step * d)
        return g

    eps = 1e-6
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    for name, h, f in zip(names, hv, fd):
        assert f.abs().max() > 0, name
        assert torch.allclose(h, f, rtol=1e-5, atol=1e-7 * f.abs().max()), \
            (name, (h - f).abs().max(), f.abs().max())


def test_pytorch_deformable_attention_replaces_the_compiled_kernel():
    from mmcv.ops import multi_scale_deform_attn as msda
    compiled = msda.MultiScaleDeformableAttnFunction
    value = torch.randn(1, 20, 2, 4, dtype=torch.float64)
    shapes = torch.tensor([[4, 4], [2, 2]])
    loc = torch.rand(1, 3, 2, 2, 2, 2, dtype=torch.float64)
    w = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64)
    with pytorch_deformable_attention():
        kernel = msda.MultiScaleDeformableAttnFunction
        assert kernel is not compiled
        out = kernel.apply(value, shapes, torch.tensor([0, 16]), loc, w, 64)
    assert msda.MultiScaleDeformableAttnFunction is compiled
    ref = msda.multi_scale_deformable_attn_pytorch(value, shapes, loc, w)
    # float64: the gather-based sampling and grid_sample agree to round-off
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

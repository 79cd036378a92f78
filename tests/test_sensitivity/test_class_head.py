"""The critical-class KL terms and their Gauss-Newton draws against exact
Hessians of small models."""
import copy

import pytest
import torch
from torch.func import functional_call

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.sensitivity import (fisher_draw, fold_softmax_logits,
                                    gauss_newton_traces, temperature_kl)
from mmdet_hawq.sensitivity.class_head import check_columns, column_groups
from .test_estimators import (LAM, T, check, exact_gauss_newton,
                              exact_traces, make, targets)

CRITICAL = [1, 3]  # of the MLP's 4 object classes (5th column: no-object)


def folded_fisher(z, critical=CRITICAL):
    """Closed form of the folded KL's Hessian in the logits at equality,
    (rows, C, C), before 1/T²: P Jᵀ diag(1/q) J P − p pᵀ."""
    p = torch.softmax(z / T, -1).reshape(-1, z.shape[-1])
    J = torch.nn.functional.one_hot(column_groups(z.shape[-1], critical)).T
    J = J.to(p.dtype)  # (groups, C)
    q = p @ J.T
    pj = p[:, None, :] * J[None]  # (rows, groups, C): J P
    return torch.einsum('rgc,rg,rgd->rcd', pj, 1 / q, pj) - \
        p[:, :, None] * p[:, None, :]


def test_fold_keeps_critical_sums_the_others_and_keeps_no_object():
    z = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]], dtype=torch.float64)
    g = fold_softmax_logits(z, T, CRITICAL)
    q, p = torch.softmax(g, -1), torch.softmax(z / T, -1)
    expected = torch.stack([p[0, 1], p[0, 3], p[0, 0] + p[0, 2], p[0, 4]])
    assert torch.allclose(q[0], expected, atol=1e-15)
    assert column_groups(5, CRITICAL).tolist() == [2, 0, 2, 1, 3]
    # every object class critical: no "other" column, the same KL
    zs = z + torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.4]], dtype=torch.float64)
    assert fold_softmax_logits(z, T, range(4)).shape == (1, 5)
    assert temperature_kl(zs, z, T, 'softmax', [0, 1, 2, 3]).item() == \
        pytest.approx(temperature_kl(zs, z, T, 'softmax').item(), rel=1e-12)
    # confusion among non-critical classes costs nothing; with no-object
    # it does
    swap = z[:, [2, 1, 0, 3, 4]]
    assert temperature_kl(swap, z, T, 'softmax', CRITICAL).item() == \
        pytest.approx(0.0, abs=1e-15)
    to_bg = z[:, [4, 1, 2, 3, 0]]
    assert temperature_kl(to_bg, z, T, 'softmax', CRITICAL).item() > 1e-3


def test_folded_kl_hessian_and_draw_second_moment():
    torch.manual_seed(0)
    z = torch.randn(3, 5, dtype=torch.float64) * 2
    assert temperature_kl(z, z.clone(), T, 'softmax', CRITICAL).item() == 0
    H = torch.autograd.functional.hessian(
        lambda s: temperature_kl(s, z, T, 'softmax', CRITICAL), z.clone())
    H = H.reshape(3, 5, 3, 5)
    blocks = torch.stack([H[r, :, r, :] for r in range(3)])
    expected = folded_fisher(z) / T**2
    assert torch.allclose(blocks, expected, atol=1e-12)
    # rows (queries) are independent
    assert H[0, :, 1, :].abs().max() == 0
    gen = torch.Generator().manual_seed(0)
    n = 20000
    u = torch.stack([fisher_draw(z, T, LAM, gen, 'softmax', CRITICAL)
                     for _ in range(n)])
    moment = torch.einsum('nrc,nrd->rcd', u, u) / n
    scale = LAM * expected.abs().max()
    assert (moment - LAM * expected).abs().max() < 0.05 * scale
    # a group's columns move together in proportion to p within the group
    p = torch.softmax(z / T, -1)
    ratio = u[:, :, 0] / u[:, :, 2]
    assert torch.allclose(ratio, (p[:, 0] / p[:, 2]).expand_as(ratio))


def test_sigmoid_kl_and_draw_keep_the_critical_columns_only():
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.float64) * 3
    H = torch.autograd.functional.hessian(
        lambda s: temperature_kl(s, z, T, 'sigmoid', CRITICAL),
        z.clone()).reshape(12, 12)
    expected = sigmoid_critical_hessian(z, CRITICAL) / T**2
    assert torch.allclose(H, torch.block_diag(*expected), atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    u = fisher_draw(z, T, LAM, gen, 'sigmoid', CRITICAL)
    assert (u[:, [0, 2]] == 0).all()
    assert torch.allclose(u.pow(2), LAM * expected.diagonal(dim1=1, dim2=2))


def distill(model, teacher, xs, n_total, activation, critical):
    t_out = [teacher(x).detach() for x in xs]

    def loss(i, params=None):
        out = model(xs[i]) if params is None else functional_call(
            model, params, (xs[i], ))
        return LAM * temperature_kl(out, t_out[i], T, activation,
                                    critical) / n_total

    return loss


def sigmoid_critical_hessian(z, critical):
    """diag(p(1-p)) on the critical columns, 0 elsewhere, (rows, C, C)."""
    p = torch.sigmoid(z / T).reshape(-1, z.shape[-1])
    mask = torch.zeros(z.shape[-1], dtype=z.dtype)
    mask[critical] = 1
    return torch.diag_embed(p * (1 - p) * mask)


@pytest.mark.parametrize('activation', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('arch', ['mlp', 'attn'])
def test_critical_gauss_newton_matches_the_exact_hessian(activation, arch):
    model, xs = make(arch)
    if arch == 'attn':  # 3 outputs: 2 classes and no-object, or 3 classes
        critical = [1] if activation == 'softmax' else [0, 2]
    else:
        critical = CRITICAL
    teacher = copy.deepcopy(model)
    n_total = sum(x[..., 0].numel() for x in xs)
    names = list(targets(model))

    def sample(i, gen):
        z = model(xs[i])
        u = fisher_draw(z, T, LAM / n_total, gen, activation, critical)
        return (u * z).sum()

    res = gauss_newton_traces(targets(model), sample, range(len(xs)),
                              tol=0.0, max_samples=200, seed=5)
    hessian = {'softmax': folded_fisher,
               'sigmoid': sigmoid_critical_hessian}[activation]
    gn = exact_gauss_newton(model, xs, names, n_total,
                            lambda z: hessian(z, critical))
    check(res, gn)
    # at the float student the residual is 0: Gauss-Newton = Hessian of the
    # restricted distillation loss
    exact = exact_traces(model, distill(model, teacher, xs, n_total,
                                        activation, critical), len(xs),
                         names)
    for n in names:
        assert gn[n] == pytest.approx(exact[n], rel=1e-6, abs=1e-12)
    full = exact_gauss_newton(
        model, xs, names, n_total,
        {'softmax': lambda z: folded_fisher(z, range(z.shape[-1] - 1)),
         'sigmoid': lambda z: sigmoid_critical_hessian(
             z, range(z.shape[-1]))}[activation])
    if activation == 'softmax' and arch == 'attn':
        # one non-critical class: the fold only renames it, same Hessian
        for n in names:
            assert gn[n] == pytest.approx(full[n], rel=1e-9)
    else:  # the restriction matters: the full-class traces differ
        assert all(abs(full[n] - gn[n]) > 0.05 * abs(full[n])
                   for n in names)


def test_critical_index_outside_the_head_is_one_line():
    check_columns([0, 3], 5, 'softmax')
    with pytest.raises(HawqUserError, match=r"\[4\] are not among the "
                       r"head's 4 classes"):
        check_columns([1, 4], 5, 'softmax')
    check_columns([4], 5, 'sigmoid')

"""Estimators against exact Hessians of small models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.sensitivity import (TraceResult, gauss_newton_traces,
                                    hutchinson_traces, softmax_fisher_draw)

T, LAM = 2.0, 0.5


class MLP(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class AttnBlock(nn.Module):

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(y + x))


def make(kind):
    torch.manual_seed(0)
    model = MLP() if kind == 'mlp' else AttnBlock()
    shape = (3, 7, 4) if kind == 'mlp' else (3, 5, 4)
    xs = [torch.randn(*shape) for _ in range(2)]  # two batches
    return model.double(), [x.double() for x in xs]


def targets(model):
    return {
        n: p for n, p in model.named_parameters()
        if n.endswith('weight') or n.endswith('in_proj_weight')
    }


def objective(kind, model, teacher, xs, labels):
    """Batch-share loss functions of the three kinds."""
    n_total = sum(x[..., 0].numel() for x in xs)
    t_out = [teacher(x).detach() for x in xs]

    def distill(i, params=None):
        out = model(xs[i]) if params is None else functional_call(
            model, params, (xs[i], ))
        ls = F.log_softmax(out / T, -1)
        lt = F.log_softmax(t_out[i] / T, -1)
        return LAM * (ls.exp() * (ls - lt)).sum() / n_total

    def task(i, params=None):
        out = model(xs[i]) if params is None else functional_call(
            model, params, (xs[i], ))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]),
                               labels[i].reshape(-1),
                               reduction='sum') / n_total

    return distill if kind != 'task' else task


def exact_traces(model, loss_fn, nb, names):
    """Exact per-layer averaged traces of Σ_i loss_fn(i)."""
    out = {}
    base = dict(model.named_parameters())
    for name in names:
        def f(w, name=name):
            params = dict(base)
            params[name] = w
            return sum(loss_fn(i, params) for i in range(nb))
        with sdpa_kernel(SDPBackend.MATH):  # fused kernels: no 2nd grad
            H = torch.autograd.functional.hessian(f, base[name].detach())
        k = base[name].numel()
        out[name] = H.reshape(k, k).diagonal().sum().item() / k
    return out


def softmax_output_hessian(z):
    """The softmax KL term's output Hessian, (rows, C, C), before λ/(T² n).
    """
    p = torch.softmax(z / T, -1).reshape(-1, z.shape[-1])
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def exact_gauss_newton(model, xs, names, n_total,
                       output_hessian=softmax_output_hessian):
    """Exact per-layer averaged traces of Jᵀ A J for the KL term, A =
    λ/(T² n) · output_hessian(student logits)."""
    out = {n: 0.0 for n in names}
    base = dict(model.named_parameters())
    for x in xs:
        A = output_hessian(model(x).detach()) * (LAM / (T * T * n_total))
        for name in names:
            def g(w, name=name):
                params = dict(base)
                params[name] = w
                return functional_call(model, params, (x, )).reshape(-1)
            J = torch.autograd.functional.jacobian(g, base[name].detach())
            J = J.reshape(A.shape[0], A.shape[1], -1)
            out[name] += torch.einsum('qci,qcd,qdi->', J, A, J).item()
    return {n: v / base[n].numel() for n, v in out.items()}


def check(result, exact, k=3.0):
    mean, se = result.mean(), result.stderr()
    for i, name in enumerate(result.names):
        tol = k * se[i] + 1e-9 + 1e-6 * abs(exact[name])
        assert abs(mean[i] - exact[name]) <= tol, (name, mean[i], se[i],
                                                   exact[name])


@pytest.mark.parametrize('arch', ['mlp', 'attn'])
@pytest.mark.parametrize('kind', ['task', 'distill_float', 'distill_quant'])
@pytest.mark.parametrize('per_layer', [False, True])
def test_hutchinson_matches_exact_hessian(arch, kind, per_layer):
    model, xs = make(arch)
    teacher = copy.deepcopy(model)
    if kind == 'distill_quant':  # student off the teacher (e.g. quantized)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    labels = [torch.randint(0, 3 if arch == 'attn' else 5, x.shape[:-1],
                            generator=gen) for x in xs]
    loss_fn = objective(kind, model, teacher, xs, labels)
    names = list(targets(model))
    exact = exact_traces(model, loss_fn, len(xs), names)
    res = hutchinson_traces(targets(model), loss_fn, range(len(xs)),
                            tol=0.0, max_samples=60, per_layer=per_layer,
                            seed=3)
    assert res.num_samples == 60
    check(res, exact)


@pytest.mark.parametrize('arch', ['mlp', 'attn'])
@pytest.mark.parametrize('at_float', [True, False])
def test_gauss_newton_matches_exact(arch, at_float):
    model, xs = make(arch)
    teacher = copy.deepcopy(model)
    if not at_float:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    n_total = sum(x[..., 0].numel() for x in xs)
    names = list(targets(model))

    def sample(i, gen):
        z = model(xs[i])
        u = softmax_fisher_draw(z, T, LAM / n_total, gen)
        return (u * z).sum()

    res = gauss_newton_traces(targets(model), sample, range(len(xs)),
                              tol=0.0, max_samples=200, seed=5)
    gn = exact_gauss_newton(model, xs, names, n_total)
    check(res, gn)
    assert (res.mean() > 0).all()
    if at_float:  # residual 0: the Gauss-Newton matrix is the Hessian
        loss_fn = objective('distill_float', model, teacher, xs, None)
        exact = exact_traces(model, loss_fn, len(xs), names)
        for n in names:
            assert gn[n] == pytest.approx(exact[n], rel=1e-6, abs=1e-12)


def test_stopping_rule_and_reproducibility():
    model, xs = make('mlp')
    teacher = copy.deepcopy(model)
    loss_fn = objective('task', model, teacher, xs,
                        [torch.zeros(x.shape[:-1], dtype=torch.long)
                         for x in xs])
    a = hutchinson_traces(targets(model), loss_fn, range(2), tol=1e9,
                          min_samples=4, max_samples=50, seed=7)
    assert a.num_samples == 4  # converged at once, but not before min
    b = hutchinson_traces(targets(model), loss_fn, range(2), tol=1e9,
                          min_samples=4, max_samples=50, seed=7)
    assert a.samples == b.samples
    c = hutchinson_traces(targets(model), loss_fn, range(2), tol=0.0,
                          min_samples=2, max_samples=6, seed=7)
    assert c.num_samples == 6 and c.samples[:4] == a.samples
    assert not c.converged(0.0).any()


def test_resume_gives_the_same_samples():
    model, xs = make('mlp')
    loss_fn = objective('task', model, model, xs,
                        [torch.zeros(x.shape[:-1], dtype=torch.long)
                         for x in xs])
    full = hutchinson_traces(targets(model), loss_fn, range(2), tol=0.0,
                             max_samples=8, seed=2)
    part = hutchinson_traces(targets(model), loss_fn, range(2), tol=0.0,
                             max_samples=3, seed=2)
    saved = TraceResult.from_dict(part.to_dict())
    resumed = hutchinson_traces(targets(model), loss_fn, range(2), tol=0.0,
                                max_samples=8, seed=2, result=saved)
    assert resumed.samples == full.samples


def test_bad_inputs_are_reported():
    model, xs = make('mlp')
    loss_fn = objective('task', model, model, xs,
                        [torch.zeros(x.shape[:-1], dtype=torch.long)
                         for x in xs])
    with pytest.raises(HawqUserError, match='empty'):
        hutchinson_traces(targets(model), loss_fn, [], max_samples=2)
    # a weight the loss does not reach: trace exactly 0, listed by name
    extra = nn.Linear(2, 2).double()
    params = dict(targets(model), unused=extra.weight)
    res = hutchinson_traces(params, loss_fn, range(2), max_samples=2)
    assert res.meta['no_gradient'] == ['unused']
    assert res.mean()[-1] == 0.0 and (res.mean()[:-1] != 0).all()
    res = gauss_newton_traces(params, lambda i, g: loss_fn(i), range(2),
                              tol=1e9, min_samples=2, max_samples=50)
    assert res.meta['no_gradient'] == ['unused']
    assert res.mean()[-1] == 0.0 and (res.mean()[:-1] > 0).all()
    # its exactly known zero trace does not keep the sampling going
    assert res.num_samples == 2 and res.rel_stderr()[-1] == 0.0

    def nan_loss(i):
        return loss_fn(i) * float('nan')

    # a loss without a batch check (the objectives have one) still stops,
    # at the traces
    with pytest.raises(HawqUserError, match='for every layer .2, e.g. fc1'):
        hutchinson_traces(targets(model), nan_loss, range(2), max_samples=2)


def test_interrupted_run_resumes_from_the_cache_file(tmp_path):
    from mmdet_hawq.sensitivity import cache_path, load_cached, save_cached
    model, xs = make('mlp')
    n_total = sum(x[..., 0].numel() for x in xs)

    def sample(i, gen):
        z = model(xs[i])
        return (softmax_fisher_draw(z, T, LAM / n_total, gen) * z).sum()

    key = dict(objective='distill', seed=4)
    path = cache_path(str(tmp_path), 'outquant', 'gauss_newton', key)

    class Interrupt(Exception):
        pass

    def save_then_stop(result):
        save_cached(path, key, result)
        if result.num_samples == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        gauss_newton_traces(targets(model), sample, range(2), tol=0.0,
                            max_samples=7, seed=4, on_sample=save_then_stop)
    saved = load_cached(path, key)
    assert saved.num_samples == 3
    assert load_cached(path, dict(key, seed=5)) is None  # other inputs
    resumed = gauss_newton_traces(targets(model), sample, range(2), tol=0.0,
                                  max_samples=7, seed=4, result=saved)
    full = gauss_newton_traces(targets(model), sample, range(2), tol=0.0,
                               max_samples=7, seed=4)
    assert resumed.samples == full.samples

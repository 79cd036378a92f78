"""Per-site activation traces (sensitivity/activation_traces.py) against the
exact Gauss–Newton traces of a tiny model, computed from its Jacobians."""
import numpy as np
import torch
import torch.nn as nn

from mmdet_hawq.quant.activations import activation_modules, captured_sites
from mmdet_hawq.sensitivity.activation_traces import activation_traces


class Tiny(nn.Module):
    """fc1 and fc3 read one activation (inside the graph); fc2 reads fc1's.
    """

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 4)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        u = torch.tanh(self.fc0(x))
        return self.fc2(torch.tanh(self.fc1(u))) + self.fc3(u)


def test_activation_traces_match_the_exact_traces():
    """With ``s = u·z``, ``u ~ N(0, I)``, the GN matrix with respect to an
    activation ``a`` is ``J_aᵀ J_a``: its trace is ``||∂z/∂a||_F²``. The
    estimate of every site's averaged trace lies within 3 standard errors
    of the exact value, and the sites differ (so the check can fail). fc1
    and fc3 read one tensor: each site's trace is that of its own path."""
    torch.manual_seed(0)
    model = Tiny().eval()
    batches = [torch.randn(5, 4) for _ in range(3)]
    names = ['fc0', 'fc1', 'fc2', 'fc3']
    sites = activation_modules(model, [f'{n}.weight' for n in names])

    def sample_fn(pos, generator):
        z = model(batches[pos])
        u = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        return (u * z).sum()

    result = activation_traces(
        lambda: captured_sites(sites, names), names,
        sample_fn, len(batches), torch.device('cpu'), tol=0.02,
        min_samples=50, max_samples=400)
    exact = dict.fromkeys(names, 0.0)
    for x in batches:
        u = torch.tanh(model.fc0(x))
        h = torch.tanh(model.fc1(u))
        paths = dict(fc0=(model, x), fc2=(model.fc2, h),
                     fc1=(lambda v: model.fc2(torch.tanh(model.fc1(v))), u),
                     fc3=(model.fc3, u))
        for name, (f, a) in paths.items():
            j = torch.autograd.functional.jacobian(f, a)  # (5, 3, 5, n)
            exact[name] += float((j**2).sum()) / a.numel()
    mean, se = result.mean(), result.stderr()
    assert result.numels == [20, 20, 30, 20]
    for i, name in enumerate(result.names):
        assert abs(mean[i] - exact[name]) <= 3 * se[i], (
            name, mean[i], exact[name], se[i])
        assert se[i] < 0.1 * exact[name]
    assert abs(exact['fc1'] - exact['fc2']) > 3 * (se[1] + se[2])
    assert abs(exact['fc1'] - exact['fc3']) > 3 * (se[1] + se[3])
    assert np.all(np.asarray(result.samples) >= 0)

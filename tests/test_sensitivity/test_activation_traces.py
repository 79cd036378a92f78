"""Per-site activation traces (sensitivity/activation_traces.py) against the
exact Gauss–Newton traces of a tiny model, computed from its Jacobians."""
import numpy as np
import torch
import torch.nn as nn

from mmdet_hawq.quant.activations import activation_modules, captured_sites
from mmdet_hawq.sensitivity.activation_traces import activation_traces


class Tiny(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_activation_traces_match_the_exact_traces():
    """With ``s = u·z``, ``u ~ N(0, I)``, the GN matrix with respect to an
    activation ``a`` is ``J_aᵀ J_a``: its trace is ``||∂z/∂a||_F²``. The
    estimate of every site's averaged trace lies within 3 standard errors
    of the exact value, and the two sites differ (so the check can fail)."""
    torch.manual_seed(0)
    model = Tiny().eval()
    batches = [torch.randn(5, 4) for _ in range(3)]
    sites = activation_modules(model, ['fc1.weight', 'fc2.weight'])

    def sample_fn(pos, generator):
        z = model(batches[pos])
        u = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        return (u * z).sum()

    result = activation_traces(
        lambda: captured_sites(sites, ['fc1', 'fc2']), ['fc1', 'fc2'],
        sample_fn, len(batches), torch.device('cpu'), tol=0.02,
        min_samples=50, max_samples=400)
    exact = {'fc1': 0.0, 'fc2': 0.0}
    for x in batches:
        jx = torch.autograd.functional.jacobian(model, x)  # (5,3,5,4)
        h = torch.tanh(model.fc1(x))
        jh = torch.autograd.functional.jacobian(model.fc2, h)
        exact['fc1'] += float((jx**2).sum()) / x.numel()
        exact['fc2'] += float((jh**2).sum()) / h.numel()
    mean, se = result.mean(), result.stderr()
    assert result.numels == [20, 30]
    for i, name in enumerate(result.names):
        assert abs(mean[i] - exact[name]) <= 3 * se[i], (
            name, mean[i], exact[name], se[i])
        assert se[i] < 0.1 * exact[name]
    assert abs(exact['fc1'] - exact['fc2']) > 3 * (se[0] + se[1])
    assert np.all(np.asarray(result.samples) >= 0)

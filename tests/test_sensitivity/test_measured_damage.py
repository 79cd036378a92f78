"""Measured damage (sensitivity/measured_damage.py) against the loss written
out, over one and two processes' shares; the choice's damage
(api/activation_sites.py::corrected_damage) against its definition."""
from contextlib import contextmanager

import pytest
import torch

from mmdet_hawq.api.activation_sites import corrected_damage
from mmdet_hawq.sensitivity import Shard
from mmdet_hawq.sensitivity.measured_damage import measured_damage


def _problem():
    """A loss of 5 batches whose value depends on which of three
    'quantizers' (additive offsets of a vector) are on."""
    torch.manual_seed(0)
    x = [torch.randn(7, dtype=torch.float64) for _ in range(5)]
    offsets = {k: torch.randn(7, dtype=torch.float64) for k in 'abc'}
    on = set()

    def loss(i):
        v = x[i] + sum((offsets[k] for k in on), torch.zeros(7,
                                                             dtype=x[i].dtype))
        return (v**2).sum()

    @contextmanager
    def quantized(group):
        on.update(group)
        try:
            yield
        finally:
            on.difference_update(group)
    return x, offsets, loss, quantized


def test_measured_damage_is_the_loss_increase_of_each_group_alone():
    x, offsets, loss, quantized = _problem()
    groups = {'first': ['a'], 'both': ['b', 'c']}
    got, base = measured_damage(loss, groups, quantized, 5,
                                torch.device('cpu'))
    want_base = sum(float((xi**2).sum()) for xi in x)
    assert base == pytest.approx(want_base, rel=1e-12)
    for name, keys in groups.items():
        shift = sum(offsets[k] for k in keys)
        want = sum(float(((xi + shift)**2).sum()) for xi in x) - want_base
        assert got[name] == pytest.approx(want, rel=1e-12)


def test_shards_add_up_to_one_process():
    _, _, loss, quantized = _problem()
    groups = {'a': ['a'], 'c': ['c']}
    whole, base = measured_damage(loss, groups, quantized, 5,
                                  torch.device('cpu'))
    parts = [measured_damage(loss, groups, quantized, 5, torch.device('cpu'),
                             Shard(r, 2)) for r in (0, 1)]

    # the all-reduce of two ranks, played by hand: each rank's totals
    totals = [torch.tensor([b] + [d + b for d in p.values()],
                           dtype=torch.float64) for p, b in parts]

    def summed(t):
        return totals[0] + totals[1]

    shared, shared_base = measured_damage(
        loss, groups, quantized, 5, torch.device('cpu'), Shard(0, 2, summed))
    assert shared_base == pytest.approx(base, rel=1e-12)
    for name in groups:
        assert shared[name] == pytest.approx(whole[name], rel=1e-12)


def test_the_choice_reads_the_measurement():
    predicted = {'a': 1.0, 'b': 2.0, 'c': 0.5, 'd': 3.0, 'e': 0.7}
    measured = {'a': 0.5, 'b': 30.0, 'c': 0.4, 'd': -1.0}
    # measured, never below 0; the prediction where nothing was measured
    assert corrected_damage(predicted, measured) == {
        'a': 0.5, 'b': 30.0, 'c': 0.4, 'd': 0.0, 'e': 0.7}

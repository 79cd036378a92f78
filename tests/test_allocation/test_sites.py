"""The int8-site choice (allocation/sites.py) against brute force."""
import itertools

import numpy as np
import pytest

from mmdet_hawq.allocation.sites import choose_int8_sites, fastest_int8_sites
from mmdet_hawq.errors import HawqUserError


def brute_force(damage, macs, share, keep_float):
    names = list(damage)
    total = sum(macs.values())
    best, best_cost = None, np.inf
    for bits in itertools.product((0, 1), repeat=len(names)):
        chosen = {n for n, b in zip(names, bits) if b}
        if chosen & set(keep_float):
            continue
        if sum(macs[n] for n in chosen) < share * total - 1e-9:
            continue
        cost = sum(damage[n] for n in chosen)
        if cost < best_cost - 1e-12:
            best, best_cost = chosen, cost
    return best, best_cost


@pytest.mark.parametrize('seed', range(6))
def test_choice_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    names = [f's{i}' for i in range(9)]
    damage = {n: float(rng.exponential()) for n in names}
    macs = {n: float(rng.integers(1, 100)) for n in names}
    keep = ['s3'] if seed % 2 else []
    for share in (0.0, 0.3, 0.6, 0.85):
        if keep and share > 1 - macs['s3'] / sum(macs.values()):
            continue
        got = choose_int8_sites(damage, macs, share, keep)
        want, cost = brute_force(damage, macs, share, keep)
        assert sum(damage[n] for n in got) == pytest.approx(cost)
        assert sum(macs[n] for n in got) >= share * sum(macs.values()) - 1e-6
        assert not set(keep) & got


def test_every_site_int8_at_full_share_and_impossible_share_is_one_line():
    damage = dict(a=1.0, b=2.0, c=0.5)
    macs = dict(a=10, b=30, c=60)
    assert choose_int8_sites(damage, macs, 1.0) == {'a', 'b', 'c'}
    assert choose_int8_sites(damage, macs, 0.6) == {'c'}
    with pytest.raises(HawqUserError, match=r'int8_macs=0.9 cannot be '
                       r'reached: .* at most 0.4000 of the MACs') as err:
        choose_int8_sites(damage, macs, 0.9, keep_float=['c'])
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('seed', range(6))
def test_fastest_within_a_damage_budget_is_the_brute_force_optimum(seed):
    """The dual: the largest gain (MACs or measured time saved) whose
    damage fits the budget, against every subset."""
    rng = np.random.default_rng(100 + seed)
    names = [f's{i}' for i in range(9)]
    damage = {n: float(rng.exponential()) for n in names}
    gain = {n: float(rng.exponential()) for n in names}
    keep = ['s5'] if seed % 2 else []
    total = sum(damage.values())
    for share in (0.0, 0.2, 0.5, 0.9, 1.0):
        budget = share * total
        got = fastest_int8_sites(damage, gain, budget, keep)
        assert sum(damage[n] for n in got) <= budget + 1e-9
        assert not set(keep) & got
        best = max(sum(gain[n] for n in c)
                   for k in range(len(names) + 1)
                   for c in itertools.combinations(names, k)
                   if not set(keep) & set(c)
                   and sum(damage[n] for n in c) <= budget + 1e-9)
        assert sum(gain[n] for n in got) == pytest.approx(best)
    with pytest.raises(HawqUserError, match='negative'):
        fastest_int8_sites(damage, gain, -1.0)

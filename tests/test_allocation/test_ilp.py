import itertools

import numpy as np
import pytest

from mmdet_hawq.allocation import (pareto_sweep, sensitivities_from_traces,
                                   solve_allocation)
from mmdet_hawq.errors import HawqUserError


def random_instance(rng, num_layers, bits):
    names = [f'l{i}' for i in range(num_layers)]
    sens = {n: float(rng.lognormal(0, 2)) for n in names}
    numels = {n: int(rng.randint(10, 5000)) for n in names}
    errors = {
        n: {b: float(rng.uniform(0.5, 1.5) * numels[n] * 4.0**(-b))
            for b in bits}
        for n in names
    }
    return names, sens, numels, errors


def brute_force(names, sens, numels, errors, bits, target):
    best, total = None, sum(numels.values())
    for combo in itertools.product(bits, repeat=len(names)):
        avg = sum(numels[n] * b for n, b in zip(names, combo)) / total
        if avg > target + 1e-9:
            continue
        cost = sum(sens[n] * errors[n][b] for n, b in zip(names, combo))
        if best is None or cost < best:
            best = cost
    return best


@pytest.mark.parametrize('seed', range(25))
def test_ilp_equals_exhaustive_search(seed):
    rng = np.random.RandomState(seed)
    bits = [3, 4, 5, 6] if seed % 2 else [2, 4, 8]
    names, sens, numels, errors = random_instance(rng, rng.randint(2, 7),
                                                  bits)
    target = rng.uniform(min(bits), max(bits))
    alloc = solve_allocation(sens, errors, numels, target, bits)
    expected = brute_force(names, sens, numels, errors, bits, target)
    assert alloc.objective == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert alloc.avg_bits <= target + 1e-9
    assert set(alloc.plan.values()) <= set(bits)


def test_detr_r50_sized_problem_is_deterministic():
    # its solve time is measured by tools/benchmark_ilp.py, not here
    rng = np.random.RandomState(0)
    names, sens, numels, errors = random_instance(rng, 130, [3, 4, 5, 6])
    a = solve_allocation(sens, errors, numels, 5.0, [3, 4, 5, 6])
    b = solve_allocation(sens, errors, numels, 5.0, [3, 4, 5, 6])
    assert a.plan == b.plan
    assert 4.99 <= a.avg_bits <= 5.0 + 1e-9


def test_memory_budget_binds():
    rng = np.random.RandomState(1)
    names, sens, numels, errors = random_instance(rng, 5, [3, 4, 5, 6])
    free = solve_allocation(sens, errors, numels, 6, [3, 4, 5, 6])
    budget = sum(numels.values()) * 4 / 8
    tight = solve_allocation(sens, errors, numels, 6, [3, 4, 5, 6],
                             max_weight_bytes=budget)
    assert tight.avg_bits <= 4 + 1e-9 < free.avg_bits


def test_infeasible_target_names_the_range():
    names, sens, numels, errors = random_instance(
        np.random.RandomState(0), 3, [3, 4])
    with pytest.raises(HawqUserError, match='from 3.0 to 4.0'):
        solve_allocation(sens, errors, numels, 2.5, [3, 4])


def test_negative_and_unconverged_traces_policy():
    used, notes = sensitivities_from_traces(['a', 'b', 'c'], [2.0, -1.0, 1.0],
                                            [0.01, 0.1, 0.9], tol=0.2)
    assert used == pytest.approx({'a': 2.01, 'b': 0.1, 'c': 1.9})
    assert notes['a'] == ''
    assert 'negative' in notes['b']
    assert 'unconverged' in notes['c']
    used, notes = sensitivities_from_traces(['a', 'b', 'c'], [2.0, -1.0, 1.0],
                                            [0.01, 0.1, 0.9], 0.2, 'zero')
    assert used == {'a': 2.0, 'b': 0.0, 'c': 1.0}
    assert notes['a'] == ''
    assert 'negative' in notes['b']
    assert 'unconverged' in notes['c']
    used, _ = sensitivities_from_traces(['b'], [-1.0], [0.1], 0.2, 'abs')
    assert used == {'b': 1.0}
    with pytest.raises(HawqUserError, match='negative'):
        sensitivities_from_traces(['b'], [-1.0], [0.1], 0.2, 'error')


def test_pareto_sweep_is_monotone():
    names, sens, numels, errors = random_instance(
        np.random.RandomState(3), 8, [2, 3, 4, 5])
    pts = pareto_sweep(sens, errors, numels, np.linspace(2, 5, 7),
                       [2, 3, 4, 5])
    perturb = [p['perturbation'] for p in pts]
    assert len(pts) == 7
    assert all(a >= b - 1e-12 for a, b in zip(perturb, perturb[1:]))


def test_zero_sensitivities_still_use_the_budget():
    names = ['a', 'b', 'c']
    sens = {'a': 0.0, 'b': 0.0, 'c': 1.0}
    numels = {'a': 100, 'b': 300, 'c': 50}
    errors = {n: {b: 4.0**-b for b in (3, 4, 5, 6)} for n in names}
    alloc = solve_allocation(sens, errors, numels, 5.0, [3, 4, 5, 6])
    assert alloc.plan['c'] == 6
    assert alloc.avg_bits == pytest.approx(5.0, abs=0.25)


def test_bops_budget_binds():
    rng = np.random.RandomState(2)
    names, sens, numels, errors = random_instance(rng, 5, [3, 4, 5, 6])
    macs = {n: 10.0 * numels[n] for n in names}
    free = solve_allocation(sens, errors, numels, 6, [3, 4, 5, 6])
    budget = sum(macs.values()) * 4 * 32  # as if every layer had 4 bits
    tight = solve_allocation(sens, errors, numels, 6, [3, 4, 5, 6],
                             macs=macs, max_bops=budget)
    bops = sum(macs[n] * b * 32 for n, b in tight.plan.items())
    assert bops <= budget + 1e-6 and tight.avg_bits < free.avg_bits
    with pytest.raises(HawqUserError, match='macs'):
        solve_allocation(sens, errors, numels, 6, [3, 4, 5, 6],
                         max_bops=budget)


def test_round_significant_values():
    from mmdet_hawq.allocation.ilp import round_significant
    assert round_significant(0.123456) == 0.123
    assert round_significant(98765.4) == 98800.0
    assert round_significant(-2.5e-7) == -2.5e-7
    assert round_significant(0.0) == 0.0
    assert round_significant(float('inf')) == float('inf')
    assert round_significant(1.23456, digits=5) == 1.2346
    # 1e-8 relative noise does not move a value away from a boundary
    rng = np.random.RandomState(0)
    for x in rng.lognormal(0, 5, size=200):
        if abs(float(f'{x:.2e}') - x) < 1e-6 * x:
            continue  # within noise of a rounding point: skip
        for eps in (1e-8, -1e-8, 3.5e-8):
            assert round_significant(x * (1 + eps)) == round_significant(x)


def test_noise_cannot_flip_a_near_tie_once_rounded():
    """Two equal layers, room for only one at 6 bits: which one gets it
    follows noise in the raw sensitivities (1e-6 relative is enough to beat
    HiGHS's tolerances), never in rounded ones."""
    from mmdet_hawq.allocation.ilp import round_significant
    names = ['a', 'b']
    numels = {n: 100 for n in names}
    errors = {n: {3: 1.0, 6: 0.01} for n in names}
    plans, rounded_plans = [], []
    for eps in (1e-6, -1e-6, 1e-8, -1e-8):
        sens = {'a': 0.4567 * (1 + eps), 'b': 0.4567}
        plans.append(solve_allocation(sens, errors, numels, 4.5,
                                      [3, 6]).plan)
        sens = {n: round_significant(v) for n, v in sens.items()}
        errs = {n: {b: round_significant(e) for b, e in e_b.items()}
                for n, e_b in errors.items()}
        rounded_plans.append(solve_allocation(sens, errs, numels, 4.5,
                                              [3, 6]).plan)
    assert plans[0] != plans[1]  # the raw near-tie follows the noise
    assert all(p == rounded_plans[0] for p in rounded_plans)
    assert sorted(rounded_plans[0].values()) == [3, 6]


def test_real_instance_solves_at_every_target():
    """The small DETR's 5-bit outquant inputs (47 layers, costs ~1e-6): the
    tie-breaking stage once crashed inside HiGHS (`vector::reserve`) at some
    targets before the objective was scaled to O(1)."""
    import json
    import os.path as osp
    with open(osp.join(osp.dirname(__file__), 'fixtures',
                       'detr_tiny_5bit_ilp.json')) as f:
        d = json.load(f)
    errors = {n: {int(b): v for b, v in e.items()}
              for n, e in d['errors'].items()}
    previous = None
    for t in np.round(np.arange(3, 6.01, 0.25), 2):
        a = solve_allocation(d['used'], errors, d['numels'], t, [3, 4, 5, 6])
        assert a.avg_bits <= t + 1e-6
        if previous is not None:  # more bits never predict more damage
            assert a.objective <= previous * (1 + 1e-9)
        previous = a.objective

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

"""Which activation sites run int8: an exact 0/1 program (scipy's ``milp``).

Cost model: under ONNX Runtime on a CPU, a layer with int8 inputs runs an
integer kernel (``QLinearConv``, ``MatMulIntegerToFloat``) whatever its
weights' bits (INT4 weights run the INT8 kernel too), and a layer with float
inputs runs the float kernel. So latency depends on the activation
precision, layer by layer, in proportion to the layer's multiply-accumulates
(MACs), and not on the weight bits; the weight bits set the size (the
weights' average-bit budget of :mod:`.ilp`). BOPs (MACs × weight bits ×
activation bits) would reward 4-bit weights with a speed they do not have
on this runtime, so the site budget is the share of the quantized layers'
MACs that run int8.

Problem: choose ``x_s ∈ {0, 1}`` (1 = int8) minimising ``Σ_s x_s·Ω_s``
(the predicted damage of quantizing site ``s``) subject to
``Σ_s x_s·MAC_s ≥ share · Σ_s MAC_s`` and ``x_s = 0`` for sites kept float.

Its dual, the fastest plan within a damage budget
(:func:`fastest_int8_sites`): maximise ``Σ_s x_s·g_s`` subject to
``Σ_s x_s·Ω_s ≤ budget``, where ``g_s`` is either the MACs or, as HAWQ-V3's
latency table, the time measured on the runtime that going int8 saves
(:mod:`mmdet_hawq.deploy.latency_table`).
"""
from typing import Mapping, Sequence, Set

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import HawqUserError

__all__ = ['choose_int8_sites', 'fastest_int8_sites']


def choose_int8_sites(damage: Mapping[str, float],
                      macs: Mapping[str, float],
                      int8_share: float,
                      keep_float: Sequence[str] = ()) -> Set[str]:
    """The int8 sites of least total predicted damage whose MACs reach
    ``int8_share`` of all.

    Args:
        damage (Mapping[str, float]): Site → predicted damage ``Ω_s`` of
            quantizing it (≥ 0).
        macs (Mapping[str, float]): Site → MACs of its layer (sites absent
            count 0).
        int8_share (float): Share of the MACs that must run int8, in
            ``[0, 1]``.
        keep_float (Sequence[str]): Sites that stay float.

    Returns:
        set[str]: The int8 sites.

    Raises:
        HawqUserError: The share cannot be reached without the sites kept
            float (one line with the largest reachable share).
    """
    names = list(damage)
    cost = np.array([max(0.0, float(damage[n])) for n in names])
    work = np.array([float(macs.get(n, 0.0)) for n in names])
    total = work.sum()
    free = np.array([n not in set(keep_float) for n in names])
    reachable = work[free].sum() / total if total > 0 else 1.0
    if int8_share > reachable + 1e-12:
        raise HawqUserError(
            f'int8_macs={int8_share} cannot be reached: with the sites kept '
            f'float ({len(names) - int(free.sum())}) at most '
            f'{reachable:.4f} of the MACs run int8; lower int8_macs or keep '
            'fewer sites float')
    if not names:
        return set()
    upper = free.astype(float)
    constraints = [LinearConstraint(work[None], lb=int8_share * total - 1e-9 *
                                    max(total, 1.0), ub=np.inf)]
    # ties in damage are broken towards more int8 MACs (faster)
    tiny = 1e-12 * (cost.max() if cost.max() > 0 else 1.0)
    objective = cost - tiny * work / max(total, 1.0)
    result = milp(objective, integrality=np.ones(len(names)),
                  bounds=Bounds(np.zeros(len(names)), upper),
                  constraints=constraints)
    if not result.success:  # pragma: no cover - reachable was checked
        raise HawqUserError(f'the site choice has no solution: '
                            f'{result.message}')
    return {n for n, x in zip(names, np.round(result.x)) if x > 0.5}


def fastest_int8_sites(damage: Mapping[str, float],
                       gain: Mapping[str, float],
                       budget: float,
                       keep_float: Sequence[str] = ()) -> Set[str]:
    """The int8 sites of largest total gain whose predicted damage stays
    within ``budget``.

    Args:
        damage (Mapping[str, float]): Site → predicted damage ``Ω_s`` of
            quantizing it (negative values count as 0).
        gain (Mapping[str, float]): Site → what going int8 gains: its MACs,
            or its measured time saved (negative values count as 0; sites
            absent gain 0).
        budget (float): The largest total damage of the int8 sites (≥ 0).
        keep_float (Sequence[str]): Sites that stay float.

    Returns:
        set[str]: The int8 sites (ties broken towards less damage).

    Raises:
        HawqUserError: The budget is negative.
    """
    if budget < 0:
        raise HawqUserError(f'a damage budget of {budget} is negative: pass '
                            'a budget of 0 or more')
    names = list(damage)
    if not names:
        return set()
    cost = np.array([max(0.0, float(damage[n])) for n in names])
    value = np.array([max(0.0, float(gain.get(n, 0.0))) for n in names])
    # in units of the total damage, so the solver's absolute feasibility
    # tolerance is a relative one; a site above the budget alone is out
    scale = cost.sum() if cost.sum() > 0 else 1.0
    cost, budget = cost / scale, budget / scale
    upper = np.array([n not in set(keep_float) and c <= budget
                      for n, c in zip(names, cost)], float)
    tiny = 1e-9 * (value.max() if value.max() > 0 else 1.0)
    result = milp(-(value - tiny * cost), integrality=np.ones(len(names)),
                  bounds=Bounds(np.zeros(len(names)), upper),
                  constraints=[LinearConstraint(cost[None], lb=-np.inf,
                                                ub=budget + 1e-12)])
    if not result.success:  # pragma: no cover - x = 0 is always feasible
        raise HawqUserError(f'the site choice has no solution: '
                            f'{result.message}')
    return {n for n, x in zip(names, np.round(result.x)) if x > 0.5}

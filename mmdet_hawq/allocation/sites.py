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
"""
from typing import Mapping, Sequence, Set

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import HawqUserError

__all__ = ['choose_int8_sites']


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

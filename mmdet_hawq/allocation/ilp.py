"""Bit allocation by integer linear programming, as in HAWQ-V3.

Choose one bit-width ``b_l`` per layer to minimise the predicted
perturbation ``Σ_l s_l · e_l(b_l)`` (``s_l`` = averaged Hessian trace,
``e_l(b) = ||Q_b(W_l) − W_ref,l||²``) subject to the average bit-width over
quantized elements being at most the target; optionally also a weight-memory
budget in bytes and a bit-operations (BOPs) budget. Solved exactly with
``scipy.optimize.milp`` (HiGHS).

Trace policy: sampled traces may be negative (the training-loss Hessian is
indefinite) or unconverged. :func:`sensitivities_from_traces` applies an
explicit policy and returns a note per layer, which reports show.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import HawqUserError

NEGATIVE_POLICIES = ('ucb', 'zero', 'abs', 'error')


def sensitivities_from_traces(
        names: Sequence[str], mean: Sequence[float], stderr: Sequence[float],
        tol: float, negative: str = 'ucb'
) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Trace estimates → the sensitivities the ILP uses, with notes.

    Policies (``negative``):

    * ``'ucb'`` (default): every layer uses the upper confidence bound
      ``max(mean, 0) + stderr``. A converged trace is barely changed; a trace
      indistinguishable from zero (or negative: the training-loss Hessian is
      indefinite, and at the 8-bit student so is the distillation one) counts
      as large as its uncertainty instead of being declared insensitive and
      sent to the lowest bit-width.
    * ``'zero'``: negative means become 0 (the layer is treated as
      insensitive); others are used as they are.
    * ``'abs'``: negative means are replaced by their magnitude (what
      HAWQ-style code does implicitly).
    * ``'error'``: a negative mean stops the run.

    A mean whose relative standard error exceeds ``tol`` is marked
    ``unconverged`` in the notes under every policy.

    Args:
        names (Sequence[str]): Layer names.
        mean (Sequence[float]): Averaged trace estimates.
        stderr (Sequence[float]): Their standard errors.
        tol (float): Relative SE above which a layer is marked unconverged.
        negative (str): Policy, see above. Defaults to 'ucb'.

    Returns:
        tuple: name → sensitivity used, name → note ('' when plain).
    """
    if negative not in NEGATIVE_POLICIES:
        raise HawqUserError(
            f'negative-trace policy {negative!r} is unknown: use one of '
            f'{", ".join(NEGATIVE_POLICIES)}')
    used, notes = {}, {}
    for name, m, se in zip(names, mean, stderr):
        note = []
        if not np.isfinite(m):
            raise HawqUserError(
                f'the trace of {name!r} is {m}: recompute the traces '
                '(delete the cache) and check the model for NaN/Inf')
        # an exact zero (every sample 0: mean and SE 0) is converged
        rel = se / abs(m) if m else (0.0 if se == 0 else np.inf)
        if negative == 'ucb':
            if m < 0:
                note.append(f'negative mean {m:.3g}')
            m = max(m, 0.0) + (se if np.isfinite(se) else 0.0)
        elif m < 0:
            if negative == 'error':
                raise HawqUserError(
                    f'the trace estimate of {name!r} is negative ({m:.3g} '
                    f'± {se:.2g}): take more samples, or set '
                    "negative_traces='ucb', 'zero' or 'abs'")
            note.append(f'negative mean {m:.3g} -> '
                        f'{"0" if negative == "zero" else "|mean|"}')
            m = 0.0 if negative == 'zero' else -m
        if not rel <= tol:
            note.append(f'unconverged (rel. SE {rel:.2f} > {tol})')
        used[name] = float(m)
        notes[name] = '; '.join(note)
    return used, notes


#: Significant digits of what the ILP sees (:func:`round_significant`):
#: far below the traces' statistical precision (rel. SE of 1-5%), far above
#: float noise (~1e-8 relative between thread counts).
PLAN_DIGITS = 3


def round_significant(value: float, digits: int = PLAN_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant decimal digits.

    The ILP's inputs are rounded with this so float noise (e.g. float32 sums
    split differently with another number of intra-op threads, ~1e-8
    relative) cannot change the plan: only a value within that noise of a
    rounding boundary (``x.xx5`` here) can still round either way.

    Args:
        value (float): Any float; 0, inf and nan are returned as they are.
        digits (int): Significant digits kept, at least 1. Defaults to
            :data:`PLAN_DIGITS`.

    Returns:
        float: The float nearest to the rounded decimal value.
    """
    value = float(value)
    if value == 0.0 or not np.isfinite(value):
        return value
    return float(f'{value:.{max(int(digits), 1) - 1}e}')


@dataclass
class Allocation:
    """The ILP's answer.

    Attributes:
        plan (dict): Layer name → bits.
        objective (float): Predicted perturbation ``Σ s_l e_l(b_l)``.
        avg_bits (float): Average bit-width over the layers' elements.
        status (str): Solver message.
        costs (dict): Layer name → {bits: s_l · e_l(bits)}.
    """

    plan: Dict[str, int]
    objective: float
    avg_bits: float
    status: str = ''
    costs: Dict[str, Dict[int, float]] = field(default_factory=dict)


def solve_allocation(sensitivity: Mapping[str, float],
                     errors: Mapping[str, Mapping[int, float]],
                     numels: Mapping[str, int],
                     target_bits: float,
                     bit_choices: Sequence[int],
                     max_weight_bytes: Optional[float] = None,
                     macs: Optional[Mapping[str, float]] = None,
                     max_bops: Optional[float] = None,
                     activation_bits: int = 32,
                     fixed: Optional[Mapping[str, int]] = None) -> Allocation:
    """Solve the bit allocation ILP exactly.

    Among plans of minimal predicted perturbation, the one with the most
    bits is returned (a second ILP), so the budget is not left unused when
    several layers' sensitivities are zero.

    Args:
        sensitivity (Mapping[str, float]): ``s_l`` per layer (≥ 0).
        errors (Mapping): ``e_l(b)`` per layer and candidate bit-width.
        numels (Mapping[str, int]): Elements per layer.
        target_bits (float): Largest allowed average bit-width.
        bit_choices (Sequence[int]): Candidate bit-widths.
        max_weight_bytes (float, optional): Budget on the layers' packed
            size in bytes. Defaults to None.
        macs (Mapping[str, float], optional): Multiply-accumulates per layer
            (needed with ``max_bops``). Defaults to None.
        max_bops (float, optional): Budget on ``Σ macs_l · b_l ·
            activation_bits``. Defaults to None.
        activation_bits (int): Activation bit-width for BOPs. Defaults to 32
            (activations stay float).
        fixed (Mapping[str, int], optional): Layers whose bit-width is set
            (e.g. gradient blind spots kept at the top of the range); each
            must be one of ``bit_choices``. Defaults to None.

    Returns:
        Allocation: The optimal plan.
    """
    names = list(sensitivity)
    bits = sorted(set(int(b) for b in bit_choices))
    if not names:
        raise HawqUserError('no layers to allocate bits to')
    L, K = len(names), len(bits)
    n = np.array([numels[name] for name in names], dtype=np.float64)
    total = n.sum()
    lo_avg, hi_avg = float(bits[0]), float(bits[-1])
    if target_bits < lo_avg - 1e-9:
        raise HawqUserError(
            f'target of {target_bits} bits on average is infeasible: with '
            f'bit-widths {bits} the achievable averages run from {lo_avg} to '
            f'{hi_avg}; raise the target or lower the bit range')
    costs = {
        name: {b: float(sensitivity[name]) * float(errors[name][b])
               for b in bits}
        for name in names
    }
    c = np.array([[costs[name][b] for b in bits] for name in names]).ravel()
    upper = np.ones((L, K))
    for name, b in (fixed or {}).items():
        if b not in bits:
            raise HawqUserError(
                f'layer {name!r} is fixed at {b} bits, outside the '
                f'candidate bit-widths {bits}')
        upper[names.index(name)] = np.array(bits) == b
    bounds = Bounds(0, upper.ravel())
    one_hot = np.kron(np.eye(L), np.ones((1, K)))
    rows = [LinearConstraint(one_hot, 1, 1)]
    bit_row = (n[:, None] * np.array(bits, dtype=np.float64)[None]).ravel()
    rows.append(LinearConstraint(bit_row[None], -np.inf,
                                 target_bits * total + 1e-6 * total))
    if max_weight_bytes is not None:
        rows.append(LinearConstraint(bit_row[None] / 8.0, -np.inf,
                                     max_weight_bytes))
    if max_bops is not None:
        if macs is None:
            raise HawqUserError('max_bops needs the per-layer macs')
        m = np.array([macs[name] for name in names], dtype=np.float64)
        bops_row = (m[:, None] * np.array(bits)[None] *
                    activation_bits).ravel()
        rows.append(LinearConstraint(bops_row[None], -np.inf, max_bops))
    # HiGHS works to absolute tolerances: the objective is scaled to O(1)
    # (real costs are ~1e-6) so they cannot swamp it; the plan is unchanged
    scale = float(np.abs(c).max())
    cn = c / scale if scale > 0 else c
    res = milp(cn, constraints=rows, integrality=np.ones_like(c),
               bounds=bounds)
    if res.x is None:
        raise HawqUserError(
            f'the bit allocation is infeasible ({res.message}): with '
            f'bit-widths {bits} the achievable averages run from {lo_avg} to '
            f'{hi_avg}; loosen the memory/BOPs budget or widen the range')
    # Among the optimal plans take one that uses the most bits: layers with
    # zero sensitivity (e.g. a negative trace under the 'zero' policy) are
    # otherwise left at arbitrary widths below the budget.
    best = float(cn @ res.x)
    try:
        tie = milp(-bit_row / bit_row.max(), constraints=rows + [
            LinearConstraint(cn[None], -np.inf, best + 1e-9 * (1 + abs(best)))
        ], integrality=np.ones_like(c), bounds=bounds)
        x = tie.x if tie.x is not None else res.x
    except ValueError:  # HiGHS can fail internally on this stage
        x = res.x
    choice = x.reshape(L, K).argmax(1)
    plan = {name: bits[k] for name, k in zip(names, choice)}
    avg = float(sum(n[i] * plan[name] for i, name in enumerate(names)) /
                total)
    obj = float(sum(costs[name][plan[name]] for name in names))
    return Allocation(plan, obj, avg, str(res.message), costs)


def pareto_sweep(sensitivity: Mapping[str, float],
                 errors: Mapping[str, Mapping[int, float]],
                 numels: Mapping[str, int], targets: Sequence[float],
                 bit_choices: Sequence[int],
                 fixed: Optional[Mapping[str, int]] = None) -> List[Dict]:
    """Solve for many average-bit targets with one set of traces.

    Returns:
        list[dict]: ``target``, ``avg_bits`` and ``perturbation`` per target
        (infeasible targets are skipped).
    """
    points = []
    for t in targets:
        try:
            a = solve_allocation(sensitivity, errors, numels, t, bit_choices,
                                 fixed=fixed)
        except HawqUserError:
            continue
        points.append(dict(target=float(t), avg_bits=a.avg_bits,
                           perturbation=a.objective))
    return points

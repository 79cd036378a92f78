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
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from ..errors import HawqUserError

NEGATIVE_POLICIES = ('ucb', 'zero', 'abs', 'error')

#: Average bit-widths up to this much above the target still meet it.
TARGET_SLACK = 1e-6

#: The ILP's objective is scaled so that the best known plan costs this
#: much: HiGHS's absolute tolerances (1e-6 on the gap, 1e-7 on feasibility)
#: are then 1e-12 of it or less, whatever the scale of the costs.
OBJECTIVE_SCALE = 1e6

#: Most first-stage solves, each scaled by the best plan found so far.
MAX_RESCALES = 4

#: A ``≤`` row of the ILP: coefficient per layer and candidate, upper bound.
Row = Tuple[np.ndarray, float]


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
                     fixed: Optional[Mapping[str, int]] = None,
                     min_bits: Optional[Mapping[str, int]] = None
                     ) -> Allocation:
    """Solve the bit allocation ILP exactly, whatever the scale of the costs.

    Among plans of minimal predicted perturbation, one with the most bits is
    returned (a second stage), so the budget is not left unused when several
    layers' sensitivities are zero. The second stage's plan is kept only if
    its exact cost is at most the first stage's optimum. How HiGHS's
    absolute tolerances are kept from mattering: see :class:`_Problem`.

    Args:
        sensitivity (Mapping[str, float]): ``s_l`` per layer (≥ 0).
        errors (Mapping): ``e_l(b)`` per layer and candidate bit-width.
        numels (Mapping[str, int]): Elements per layer.
        target_bits (float): Largest allowed average bit-width (up to
            :data:`TARGET_SLACK` above it counts as meeting it).
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
        min_bits (Mapping[str, int], optional): Layers that may not go below
            a bit-width (e.g. the backbone at 3 bits or more). Defaults to
            None.

    Returns:
        Allocation: The optimal plan.
    """
    names = list(sensitivity)
    bits = sorted(set(int(b) for b in bit_choices))
    if not names:
        raise HawqUserError('no layers to allocate bits to')
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
    cost = np.array([[costs[name][b] for b in bits] for name in names])
    for name, row in zip(names, cost):
        if not np.isfinite(row).all():
            raise HawqUserError(
                f'the predicted perturbation of {name!r} is not finite '
                f'({costs[name]}): check its sensitivity and error terms')
    allowed = np.ones(cost.shape, dtype=bool)
    for name, b in (fixed or {}).items():
        if b not in bits:
            raise HawqUserError(
                f'layer {name!r} is fixed at {b} bits, outside the '
                f'candidate bit-widths {bits}')
        allowed[names.index(name)] = np.array(bits) == b
    for name, b in (min_bits or {}).items():
        if b > bits[-1]:
            raise HawqUserError(
                f'layer {name!r} may not go below {b} bits, above the '
                f'largest candidate bit-width {bits[-1]}: lower its min_bits '
                'or raise the bit range')
        if name not in (fixed or {}):
            allowed[names.index(name)] &= np.array(bits) >= b
    width = np.array(bits, dtype=np.float64)[None]
    bit_use = n[:, None] * width
    budgets = [(bit_use, target_bits * total + TARGET_SLACK * total)]
    if max_weight_bytes is not None:
        budgets.append((bit_use, 8.0 * max_weight_bytes))
    if max_bops is not None:
        if macs is None:
            raise HawqUserError('max_bops needs the per-layer macs')
        m = np.array([macs[name] for name in names], dtype=np.float64)
        budgets.append((m[:, None] * width * activation_bits,
                        float(max_bops)))
    if not _fits(allowed.argmax(1), budgets):  # the fewest bits allowed
        raise HawqUserError(
            f'the bit allocation is infeasible: with bit-widths {bits} the '
            f'achievable averages run from {lo_avg} to {hi_avg}, and even '
            'the fewest bits allowed exceed a budget; loosen the memory/BOPs '
            'budget or the target, lower min_bits, unfix layers or widen '
            'the range')
    problem = _Problem(cost, allowed, budgets, bit_use)
    first, message = problem.least_cost()
    choice = problem.most_bits(first)
    plan = {name: bits[k] for name, k in zip(names, choice)}
    avg = float(sum(n[i] * plan[name] for i, name in enumerate(names)) /
                total)
    obj = math.fsum(costs[name][plan[name]] for name in names)
    return Allocation(plan, obj, avg, message, costs)


def _plan_sum(values: np.ndarray, choice: np.ndarray) -> float:
    """Exact (correctly rounded) sum of one value per layer.

    Args:
        values (np.ndarray): Value per layer (rows) and candidate (columns).
        choice (np.ndarray): Chosen column per layer.

    Returns:
        float: ``Σ_l values[l, choice[l]]``.
    """
    return math.fsum(values[np.arange(len(choice)), choice])


def _fits(choice: np.ndarray, budgets: Sequence[Row]) -> bool:
    """Whether a plan meets every budget exactly.

    Args:
        choice (np.ndarray): Chosen column per layer.
        budgets (Sequence[Row]): Use per layer and candidate, and limit.

    Returns:
        bool: True when each use sums to at most its limit.
    """
    return all(_plan_sum(use, choice) <= limit for use, limit in budgets)


def _milp(objective: np.ndarray, keep: np.ndarray,
          rows: Sequence[Row]) -> Tuple[Optional[np.ndarray], str]:
    """One HiGHS solve over the kept candidates, with a zero relative gap.

    Args:
        objective (np.ndarray): Objective per layer and candidate.
        keep (np.ndarray): Candidates that may be chosen, one per layer at
            least.
        rows (Sequence[Row]): The ``≤`` rows.

    Returns:
        tuple: Chosen column per layer (None without a solution) and the
        solver's message.
    """
    cols = np.flatnonzero(keep.ravel())
    num_layers, num_bits = keep.shape
    one_hot = sparse.csr_array(
        (np.ones(len(cols)), (cols // num_bits, np.arange(len(cols)))),
        shape=(num_layers, len(cols)))
    constraints = [LinearConstraint(one_hot, 1, 1)] + [
        LinearConstraint(coef.ravel()[cols][None], -np.inf, upper)
        for coef, upper in rows
    ]
    res = milp(objective.ravel()[cols], constraints=constraints,
               integrality=np.ones(len(cols)), bounds=Bounds(0, 1),
               options=dict(mip_rel_gap=0.0))
    if res.x is None:
        return None, str(res.message)
    x = np.zeros(keep.size)
    x[cols] = res.x
    return x.reshape(keep.shape).argmax(1), str(res.message)


class _Problem:
    """The allocation ILP as arrays (a row per layer, a column per candidate
    bit-width), solved so that HiGHS's absolute tolerances cannot matter.

    * Each layer's cheapest allowed cost is subtracted (a constant): the
      objective, :attr:`extra`, is ≥ 0 with an exact zero in every layer.
    * A greedy plan, and Lagrangian prices on the budgets from the LP
      relaxation, drop every candidate that is in no plan costing at most
      a known plan's cost (:meth:`keep`); usually few layers keep more
      than one candidate, and HiGHS solves only what is left.
    * HiGHS runs with a zero relative gap on the objective scaled so that
      the best known plan costs :data:`OBJECTIVE_SCALE`; its absolute
      tolerances are then 1e-12 of that cost or less. When its plan costs
      less than half of that plan, it runs again at the new scale.
    * Every plan is checked exactly (:func:`_fits`, :func:`_plan_sum`);
      HiGHS's plans replace a known plan only when they are not worse.

    Args:
        cost (np.ndarray): ``s_l · e_l(b)`` per layer and candidate.
        allowed (np.ndarray): Candidates that may be chosen.
        budgets (Sequence[Row]): Use per layer and candidate, and limit;
            the first one is the bit budget, and the fewest bits allowed
            must meet them all.
        bit_use (np.ndarray): Bits times elements per layer and candidate.
    """

    def __init__(self, cost: np.ndarray, allowed: np.ndarray,
                 budgets: Sequence[Row], bit_use: np.ndarray) -> None:
        self.cost, self.allowed = cost, allowed
        self.budgets, self.bit_use = list(budgets), bit_use
        lowest = np.where(allowed, cost, np.inf).min(1, keepdims=True)
        self.extra = np.where(allowed, cost - lowest, 0.0)
        self.greedy = self._greedy()
        self.slack, self.floor = self._lagrangian(self.greedy)

    def _greedy(self) -> np.ndarray:
        """From the fewest bits, repeatedly the change that saves the most
        cost per extra bit and still fits.

        Returns:
            np.ndarray: Chosen column per layer (it meets every budget).
        """
        layers = np.arange(len(self.extra))
        choice = self.allowed.argmax(1)
        while True:
            gain = self.extra[layers, choice][:, None] - self.extra
            ok = self.allowed & (gain > 0)
            for use, limit in self.budgets:
                ok &= (use - use[layers, choice][:, None] <=
                       limit - _plan_sum(use, choice))
            if not ok.any():
                return choice
            more = self.bit_use - self.bit_use[layers, choice][:, None]
            rate = np.where(more > 0, gain / np.where(more > 0, more, 1.0),
                            np.inf)
            layer, k = np.unravel_index(np.where(ok, rate, -1.0).argmax(),
                                        rate.shape)
            choice[layer] = k

    def _lagrangian(self, choice: np.ndarray) -> Tuple[np.ndarray, float]:
        """Lagrangian slacks: what each candidate costs at least beyond a
        bound.

        With prices ``λ_j ≥ 0`` on the budgets, a plan that meets them
        costs at least ``bound + Σ_l slack[l, b_l]``, so a candidate whose
        slack exceeds ``upper − bound`` is in no plan costing at most
        ``upper``. Any prices give a valid bound; the LP relaxation's duals
        prune the most.

        Args:
            choice (np.ndarray): A plan that meets the budgets (scales the
                LP).

        Returns:
            tuple: Slack per layer and candidate (inf where not allowed),
            and the bound less a margin for rounding.
        """
        scale = _plan_sum(self.extra, choice) or 1.0
        cols = np.flatnonzero(self.allowed.ravel())
        num_layers, num_bits = self.allowed.shape
        prices = np.zeros(len(self.budgets))  # valid, if weak
        try:
            res = linprog(
                self.extra.ravel()[cols] / scale,
                A_ub=np.array([use.ravel()[cols]
                               for use, _ in self.budgets]),
                b_ub=[limit for _, limit in self.budgets],
                A_eq=sparse.csr_array(
                    (np.ones(len(cols)), (cols // num_bits,
                                          np.arange(len(cols)))),
                    shape=(num_layers, len(cols))),
                b_eq=np.ones(num_layers), bounds=(0, 1), method='highs')
        except ValueError:  # HiGHS can fail internally
            res = None
        if res is not None and res.status == 0:
            prices = np.maximum(-res.ineqlin.marginals, 0.0) * scale
        priced = np.where(self.allowed, self.extra, np.inf)
        for price, (use, _) in zip(prices, self.budgets):
            priced = priced + price * use
        least = priced.min(1)
        charged = math.fsum(p * limit
                            for p, (_, limit) in zip(prices, self.budgets))
        margin = 1e-9 * (math.fsum(least) + charged + scale)
        return priced - least[:, None], math.fsum(least) - charged - margin

    def keep(self, upper: float, choice: np.ndarray) -> np.ndarray:
        """Candidates that may be in a plan costing at most ``upper``.

        Args:
            upper (float): Cost (of :attr:`extra`) not to exceed.
            choice (np.ndarray): A plan of that cost (always kept).

        Returns:
            np.ndarray: Mask per layer and candidate.
        """
        keep = (self.allowed & (self.extra <= upper) &
                (self.slack <= upper - self.floor))
        keep[np.arange(len(choice)), choice] = True
        return keep

    def least_cost(self) -> Tuple[np.ndarray, str]:
        """The first stage: a plan of least cost.

        Returns:
            tuple: Chosen column per layer and the solver's message.
        """
        choice = self.greedy
        upper = _plan_sum(self.extra, choice)
        message = 'the greedy plan is optimal'
        for _ in range(MAX_RESCALES):
            keep = self.keep(upper, choice)
            if upper == 0 or (keep.sum(1) == 1).all():
                break
            found, message = _milp(self.extra / upper * OBJECTIVE_SCALE,
                                   keep, self.budgets)
            if found is None:
                raise HawqUserError(
                    f'HiGHS found no bit allocation ({message}) although '
                    'a plan within the budgets exists')
            value = _plan_sum(self.extra, found)
            if value > upper or not _fits(found, self.budgets):
                break  # tolerance-level noise: the known plan is as good
            choice, scale, upper = found, upper, value
            if value >= scale / 2:
                break  # scaled by at most twice the optimum: done
        return choice, message

    def most_bits(self, choice: np.ndarray) -> np.ndarray:
        """The second stage: among plans as cheap as ``choice``, one with
        the most bits.

        First each layer may move among candidates that cost exactly what
        its first-stage one costs (so the total cannot change); then to any
        plan of at most the first stage's cost, capped in the cost scaled
        like the first stage. A plan is taken only if it meets the budgets,
        has more bits, and its exact cost is not above ``choice``'s.

        Args:
            choice (np.ndarray): The first stage's plan.

        Returns:
            np.ndarray: ``choice``, or a plan of at most its exact cost and
            more bits.
        """
        layers = np.arange(len(choice))
        best = _plan_sum(self.extra, choice)
        limit = _plan_sum(self.cost, choice)
        rows = list(self.budgets)
        if best > 0:
            rows.append((self.extra / best * OBJECTIVE_SCALE,
                         OBJECTIVE_SCALE))
        same = self.allowed & (self.cost ==
                               self.cost[layers, choice][:, None])
        for keep, limits in ((same, self.budgets),
                             (self.keep(best, choice), rows)):
            keep[layers, choice] = True
            widest = np.where(keep, self.bit_use, 0).max(1)
            if (self.bit_use[layers, choice] >= widest).all():
                continue  # every layer is at its widest candidate
            try:
                found, _ = _milp(-self.bit_use, keep, limits)
            except ValueError:  # HiGHS can fail internally
                continue
            if (found is not None and _fits(found, self.budgets)
                    and _plan_sum(self.cost, found) <= limit
                    and _plan_sum(self.bit_use, found) >
                    _plan_sum(self.bit_use, choice)):
                choice = found
        return choice


def pareto_sweep(sensitivity: Mapping[str, float],
                 errors: Mapping[str, Mapping[int, float]],
                 numels: Mapping[str, int], targets: Sequence[float],
                 bit_choices: Sequence[int],
                 fixed: Optional[Mapping[str, int]] = None,
                 min_bits: Optional[Mapping[str, int]] = None) -> List[Dict]:
    """Solve for many average-bit targets with one set of traces (and the
    same ``fixed`` and ``min_bits`` as :func:`solve_allocation`).

    Returns:
        list[dict]: ``target``, ``avg_bits`` and ``perturbation`` per target
        (infeasible targets are skipped).
    """
    points = []
    for t in targets:
        try:
            a = solve_allocation(sensitivity, errors, numels, t, bit_choices,
                                 fixed=fixed, min_bits=min_bits)
        except HawqUserError:
            continue
        points.append(dict(target=float(t), avg_bits=a.avg_bits,
                           perturbation=a.objective))
    return points

"""Bit allocation: the exact ILP over per-layer bit-widths (scipy's
``milp``) and the 0/1 choice of int8 activation sites."""
from .ilp import (NEGATIVE_POLICIES, Allocation, pareto_sweep,
                  sensitivities_from_traces, solve_allocation)

__all__ = [
    'NEGATIVE_POLICIES', 'Allocation', 'pareto_sweep',
    'sensitivities_from_traces', 'solve_allocation'
]

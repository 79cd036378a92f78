from .ilp import (NEGATIVE_POLICIES, Allocation, pareto_sweep,
                  sensitivities_from_traces, solve_allocation)

__all__ = [
    'NEGATIVE_POLICIES', 'Allocation', 'pareto_sweep',
    'sensitivities_from_traces', 'solve_allocation'
]

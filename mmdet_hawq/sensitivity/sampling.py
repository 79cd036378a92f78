"""Per-layer trace samples, their running statistics and the stopping rule.

Both estimators (:mod:`.hutchinson`, :mod:`.gauss_newton`) produce, per
sample, one unbiased estimate of every layer's averaged trace
``tr(H_ll) / numel_l``. :class:`TraceResult` keeps every sample, so means and
standard errors are exact functions of the samples, a run can be resumed from
saved samples, and the stopping rule is one testable function.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import HawqUserError, short_list


@dataclass
class TraceResult:
    """Samples of averaged per-layer traces and their statistics.

    Attributes:
        names (list[str]): Layer (weight) names, in model order.
        numels (list[int]): Elements per layer.
        samples (list[list[float]]): One row per sample, one column per layer.
        estimator (str): Which estimator produced the samples.
        objective (str): Which objective was differentiated.
        seconds (float): Wall time spent on the samples.
        meta (dict): Anything else worth keeping (seed, hashes, settings).
    """

    names: List[str]
    numels: List[int]
    samples: List[List[float]] = field(default_factory=list)
    estimator: str = ''
    objective: str = ''
    seconds: float = 0.0
    meta: Dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def mean(self) -> np.ndarray:
        """Per-layer mean, shape (L,)."""
        return np.asarray(self.samples, dtype=np.float64).mean(0)

    def stderr(self) -> np.ndarray:
        """Per-layer standard error of the mean, shape (L,); inf if n < 2."""
        s = np.asarray(self.samples, dtype=np.float64)
        if len(s) < 2:
            return np.full(len(self.names), np.inf)
        return s.std(0, ddof=1) / math.sqrt(len(s))

    def rel_stderr(self) -> np.ndarray:
        """Per-layer ``stderr / |mean|``: inf where the mean is 0, except 0
        where every sample is exactly 0 (a weight without gradient: its
        trace is known exactly and must not keep the sampling going)."""
        mean, se = np.abs(self.mean()), self.stderr()
        exact_zero = ~np.asarray(self.samples).any(0)
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(mean > 0, se / mean,
                            np.where(exact_zero, 0.0, np.inf))

    def converged(self, tol: float) -> np.ndarray:
        """Per-layer flag: relative standard error ≤ ``tol``."""
        return self.rel_stderr() <= tol

    def to_dict(self) -> Dict:
        """JSON-friendly dict (samples included)."""
        return dict(
            names=self.names, numels=self.numels, samples=self.samples,
            estimator=self.estimator, objective=self.objective,
            seconds=self.seconds, meta=self.meta)

    @classmethod
    def from_dict(cls, d: Dict) -> 'TraceResult':
        return cls(**d)

    def summary_rows(self, tol: Optional[float] = None) -> List[Dict]:
        """One dict per layer: mean, stderr, rel. stderr, converged."""
        mean, se, rel = self.mean(), self.stderr(), self.rel_stderr()
        rows = []
        for i, name in enumerate(self.names):
            row = dict(name=name, numel=self.numels[i],
                       trace_mean=float(mean[i]), trace_se=float(se[i]),
                       trace_rel_se=float(rel[i]),
                       num_samples=self.num_samples)
            if tol is not None:
                row['converged'] = bool(rel[i] <= tol)
            rows.append(row)
        return rows


def should_stop(result: TraceResult, tol: float, min_samples: int,
                max_samples: int) -> bool:
    """Stop once every layer's relative SE ≤ ``tol`` (after ``min_samples``)
    or when ``max_samples`` are taken.

    Args:
        result (TraceResult): Samples so far.
        tol (float): Relative standard error target.
        min_samples (int): Never stop before this many samples (≥ 2).
        max_samples (int): Always stop at this many samples.

    Returns:
        bool: Whether to stop.
    """
    n = result.num_samples
    if n >= max_samples:
        return True
    if n < max(2, min_samples):
        return False
    return bool(result.converged(tol).all())


def check_finite(values: Sequence[float], names: Sequence[str],
                 what: str) -> None:
    """Stop with one line naming the layers whose value is not finite.

    Args:
        values (Sequence[float]): One value per layer.
        names (Sequence[str]): The layers' (weights') names.
        what (str): What the values are, e.g. ``'gauss_newton trace sample
            3'``.

    Raises:
        HawqUserError: A value is NaN or Inf. When every layer's is, the
            loss or the outputs are to blame (the checkpoint or the
            images); otherwise the named layers' gradients overflow, and
            excluding them from quantization is the fix.
    """
    bad = [n for n, v in zip(names, values) if not math.isfinite(v)]
    if not bad:
        return
    if len(bad) == len(names):
        raise HawqUserError(
            f'{what} is NaN/Inf for every layer ({len(bad)}, e.g. '
            f'{bad[0]}): the loss or the outputs are not finite; check '
            'that the checkpoint fits the config and the calibration images')
    raise HawqUserError(
        f'{what} is NaN/Inf for {len(bad)} of {len(names)} layers: '
        f'{short_list(bad, 3)}: their gradients overflow; keep them in '
        f"float with the hook's exclude=[...] (e.g. exclude=['{bad[0]}']) "
        'or check their weights in the checkpoint')


def note_unused(result: TraceResult, names: Sequence[str],
                grads: Sequence) -> None:
    """Record in ``result.meta['no_gradient']`` the targeted weights that got
    no gradient (``None``): their trace is 0 by construction, and whether
    they matter is decided by the output-influence check, not by the trace.
    """
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        known = result.meta.setdefault('no_gradient', [])
        known.extend(n for n in unused if n not in known)


#: ``sample_sums(index) → (L,) float64`` per-layer sums of one sample over
#: this process's batches (before the cross-process sum), on any device.
SampleSums = Callable[[int], torch.Tensor]


def start_result(result: Optional[TraceResult], names: Sequence[str],
                 numels: Sequence[int], estimator: str,
                 objective: str) -> TraceResult:
    """A new result, or ``result`` checked to be of the same layers and
    estimator (a resumed run)."""
    if result is None:
        return TraceResult(list(names), list(numels), estimator=estimator,
                           objective=objective)
    if result.names != list(names) or result.estimator != estimator:
        raise ValueError('the saved samples are of other layers or of '
                         'another estimator: start a new run')
    return result


def sample_traces(result: TraceResult, sample_sums: SampleSums, tol: float,
                  min_samples: int, max_samples: int,
                  on_sample: Optional[Callable[[TraceResult], None]],
                  shard) -> TraceResult:
    """The sampling loop both estimators share: draw samples until every
    layer converges (:func:`should_stop`), summing each sample's per-layer
    partial sums across processes.

    Args:
        result (TraceResult): Samples so far (see :func:`start_result`);
            appended to.
        sample_sums (Callable): See :data:`SampleSums`.
        tol (float): Relative SE target.
        min_samples (int): Fewest samples.
        max_samples (int): Most samples.
        on_sample (Callable, optional): Called after each sample.
        shard (Shard): This process's share and the cross-process sum.

    Returns:
        TraceResult: ``result`` with all samples.
    """
    numels = torch.tensor(result.numels, dtype=torch.float64)
    while not should_stop(result, tol, min_samples, max_samples):
        start = time.perf_counter()
        # the one device-to-host copy of a sample
        total = shard.sum(sample_sums(result.num_samples)).cpu()
        row = (total / numels).tolist()
        check_finite(row, result.names,
                     f'{result.estimator} trace sample '
                     f'{result.num_samples + 1}')
        result.samples.append(row)
        result.seconds += time.perf_counter() - start
        if on_sample is not None:
            on_sample(result)
    return result

"""Per-tensor activation quantization: the inputs of the quantized layers,
as pure functions plus forward pre-hooks.

An activation site is an input of a module whose weight is quantized: that
of a ``Linear`` or ``Conv2d`` (named like the module), and the query, key
and value of an ``nn.MultiheadAttention`` (its packed input projection;
``'<module>:query'`` and so on). Its values are
quantized asymmetrically to ``bits`` unsigned codes, the layout ONNX
Runtime's QDQ format gives activations:

``Q(x) = (clamp(round(x / s) + z, 0, 2^b − 1) − z) · s``,
``s = (hi − lo) / (2^b − 1)``, ``z = round(−lo / s)``,

for a calibrated range ``[lo, hi]`` that contains 0 (so 0 is exact). The
range comes from the calibration images (:func:`observe_sites`) by one of
:data:`RANGE_METHODS`: ``'minmax'`` (the observed range), ``'percentile'``
(the 0.01% and 99.99% quantiles) or ``'mse'`` (the clipping of the observed
range that minimises the mean squared quantization error of the observed
values).
"""
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence)

import torch
import torch.nn as nn

from ..errors import HawqUserError

RANGE_METHODS = ('minmax', 'percentile', 'mse')
#: Values kept per site and batch for the percentile and MSE ranges (a
#: strided subsample of the activation), and at most per site.
SAMPLE_PER_BATCH = 4096
SAMPLE_PER_SITE = 1 << 18
#: Quantile of the percentile range, at each end.
PERCENTILE = 1e-4
#: Clipping factors of the observed range tried by the MSE range.
MSE_CLIPS = tuple(i / 40 for i in range(12, 41))


@dataclass(frozen=True)
class ActivationRange:
    """A site's calibrated range and its quantizer.

    Attributes:
        lo (float): Lower end (≤ 0).
        hi (float): Upper end (≥ 0).
        bits (int): Bits of the unsigned codes.
    """

    lo: float
    hi: float
    bits: int = 8

    def qparams(self) -> tuple:
        """``(scale, zero_point)`` of the range (scale 1 for an empty
        range, whose values are all 0)."""
        levels = 2**self.bits - 1
        scale = (self.hi - self.lo) / levels or 1.0
        return scale, int(round(-self.lo / scale))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the range's grid (same shape, dtype and device)."""
        scale, zero = self.qparams()
        codes = torch.clamp(torch.round(x / scale) + zero, 0,
                            2**self.bits - 1)
        return (codes - zero) * scale


def activation_modules(model: nn.Module,
                       weights: Sequence[str]) -> Dict[str, nn.Module]:
    """Module name → module, for every module whose quantized weight
    (in ``weights``) multiplies the module's inputs: ``Linear``,
    ``Conv2d`` and ``nn.MultiheadAttention`` (its input projection)."""
    names = set(weights)
    sites = {}
    for name, module in model.named_modules():
        prefix = f'{name}.' if name else ''
        if isinstance(module, (nn.Linear, nn.Conv2d)) and \
                f'{prefix}weight' in names:
            sites[name] = module
        elif isinstance(module, nn.MultiheadAttention) and (
                f'{prefix}in_proj_weight' in names or
                f'{prefix}q_proj_weight' in names):
            sites[name] = module
    return sites


ATTENTION_INPUTS = ('query', 'key', 'value')


def _inputs(name: str, module: nn.Module, args: tuple,
            kwargs: dict) -> Dict[str, torch.Tensor]:
    """Site name → tensor, for the inputs a module's sites quantize: a
    layer's input, or an attention's query, key and value."""
    if isinstance(module, nn.MultiheadAttention):
        given = dict(zip(ATTENTION_INPUTS, args[:3]))
        given.update({k: v for k, v in kwargs.items()
                      if k in ATTENTION_INPUTS})
        return {f'{name}:{k}': v for k, v in given.items()
                if torch.is_tensor(v)}
    return {name: args[0]} if args and torch.is_tensor(args[0]) else {}


class _Observer:
    """Running min/max and a strided sample of one site's values."""

    def __init__(self) -> None:
        self.lo, self.hi = 0.0, 0.0
        self.samples: List[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if self.kept < SAMPLE_PER_SITE:
            step = max(1, math.ceil(flat.numel() / SAMPLE_PER_BATCH))
            part = flat[::step].cpu()
            self.samples.append(part)
            self.kept += part.numel()


@contextmanager
def observe_sites(sites: Mapping[str, nn.Module]
                  ) -> Iterator[Dict[str, _Observer]]:
    """Inside the block, every forward of a site records its input values.

    Yields:
        dict[str, _Observer]: Site name → its observations (sites that did
        not run have none).
    """
    observers: Dict[str, _Observer] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for site, x in _inputs(name, module, args, kwargs).items():
                observers.setdefault(site, _Observer()).add(x)
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, m in sites.items()]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


def calibrate_range(observer: _Observer, method: str,
                    bits: int = 8) -> ActivationRange:
    """A site's range from its observations by ``method``.

    Raises:
        HawqUserError: An unknown method.
    """
    if method not in RANGE_METHODS:
        raise HawqUserError(
            f'activation range method {method!r} is unknown: use one of '
            f'{", ".join(RANGE_METHODS)}')
    full = ActivationRange(observer.lo, observer.hi, bits)
    if method == 'minmax' or not observer.samples:
        return full
    values = torch.cat(observer.samples)
    if method == 'percentile':
        lo, hi = torch.quantile(values, torch.tensor(
            [PERCENTILE, 1 - PERCENTILE], dtype=values.dtype,
            device=values.device)).tolist()
        return ActivationRange(min(lo, 0.0), max(hi, 0.0), bits)
    best, best_err = full, math.inf
    for clip in MSE_CLIPS:
        cand = ActivationRange(full.lo * clip, full.hi * clip, bits)
        err = float(((cand.fake_quantize(values) - values)**2).mean())
        if err < best_err:
            best, best_err = cand, err
    return best


@contextmanager
def quantized_activations(sites: Mapping[str, nn.Module],
                          ranges: Mapping[str, ActivationRange]
                          ) -> Iterator[None]:
    """Inside the block, the inputs of every site in ``ranges`` are
    fake-quantized to its range (the sites' forward pre-hooks)."""
    handles = attach_activation_quantizers(sites, ranges)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attach_activation_quantizers(
        sites: Mapping[str, nn.Module],
        ranges: Mapping[str, ActivationRange],
        quantize: Optional[Callable[[ActivationRange, torch.Tensor],
                                    torch.Tensor]] = None) -> List[Any]:
    """Fake-quantize the inputs of every site in ``ranges`` from now on
    (forward pre-hooks on the sites' modules); returns the hooks' handles.

    ``quantize(range, x)`` does it (default: :meth:`ActivationRange.
    fake_quantize`; the ONNX export passes one that exports as
    ``QuantizeLinear`` → ``DequantizeLinear``).
    """
    if quantize is None:
        def quantize(rng: ActivationRange, x: torch.Tensor) -> torch.Tensor:
            return rng.fake_quantize(x)

    def hook(name: str) -> Callable[..., Any]:
        def quantize_inputs(module: nn.Module, args: tuple,
                            kwargs: dict) -> Any:
            if isinstance(module, nn.MultiheadAttention):
                def q(key: str, v: Any) -> Any:
                    rng = ranges.get(f'{name}:{key}')
                    return v if rng is None or not torch.is_tensor(v) else \
                        quantize(rng, v)
                args = tuple(q(ATTENTION_INPUTS[i], a) if i < 3 else a
                             for i, a in enumerate(args))
                kwargs = {k: q(k, v) if k in ATTENTION_INPUTS else v
                          for k, v in kwargs.items()}
                return args, kwargs
            if name in ranges and args and torch.is_tensor(args[0]):
                return ((quantize(ranges[name], args[0]), ) +
                        tuple(args[1:]), kwargs)
            return None
        return quantize_inputs

    modules = {n.split(':')[0] for n in ranges}
    return [sites[n].register_forward_pre_hook(hook(n), with_kwargs=True)
            for n in sites if n in modules]


def save_ranges(ranges: Mapping[str, ActivationRange], path: str) -> None:
    """Write the sites' ranges as JSON (``activations.json``)."""
    with open(path, 'w') as f:
        json.dump({n: dict(lo=r.lo, hi=r.hi, bits=r.bits)
                   for n, r in ranges.items()}, f, indent=1)


def load_ranges(path: str) -> Dict[str, ActivationRange]:
    """Read :func:`save_ranges`' file.

    Raises:
        HawqUserError: The file cannot be read or is not a map of site
            names to ``{"lo", "hi", "bits"}``.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
        return {n: ActivationRange(float(r['lo']), float(r['hi']),
                                   int(r['bits'])) for n, r in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise HawqUserError(
            f'activation ranges {path!r} could not be read ({err}): give '
            "the activations.json of a run with the 'activations' "
            'setting') from None


def sites_of(model: nn.Module,
             ranges: Mapping[str, ActivationRange]) -> Dict[str, nn.Module]:
    """The modules the sites of ``ranges`` belong to (e.g. to put a saved
    run's quantizers on a rebuilt model).

    Raises:
        HawqUserError: A site names no module of ``model``.
    """
    modules = dict(model.named_modules())
    out = {}
    for site in ranges:
        name = site.split(':')[0]
        if name not in modules:
            raise HawqUserError(
                f'activation site {site!r} is not a module of '
                f'{type(model).__name__}: give the activation ranges of a '
                'run on the same model')
        out[name] = modules[name]
    return out

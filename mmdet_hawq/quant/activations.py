"""Per-tensor activation quantization: the inputs of the quantized layers,
as pure functions plus forward pre-hooks.

An activation site is an input of a module whose weight is quantized: that
of a ``Linear`` or ``Conv2d`` (named like the module), and the query, key
and value of an ``nn.MultiheadAttention`` (its packed input projection;
``'<module>:query'`` and so on); and the output of a quantized ``Conv2d``
(``'<module>:output'``), taken after the ``BatchNorm`` that normalizes it
where one does (then ``<module>`` is that norm layer,
:func:`conv_output_modules`): an integer convolution kernel writes integer
outputs, so the export needs that tensor's range. Its values are
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
                    Sequence, Tuple)

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


#: Suffix of an output site's name.
OUTPUT = ':output'


def conv_output_modules(model: nn.Module, convs: Sequence[str],
                        run: Callable[[], Any]) -> Dict[str, str]:
    """Where the output site of every ``Conv2d`` in ``convs`` is: the
    ``BatchNorm`` that takes the convolution's output as its input (found by
    running ``run()`` once, with hooks, and comparing the tensors), else the
    convolution itself. The export folds such a ``BatchNorm`` into the
    convolution (:func:`~mmdet_hawq.deploy.onnx_integer.fold_batch_norms`),
    so the quantized tensor is the integer kernel's output.

    Args:
        model (nn.Module): The model.
        convs (Sequence[str]): Names of ``Conv2d`` modules.
        run (Callable): One forward pass of ``model``.

    Returns:
        dict[str, str]: Convolution → module whose output is the site
        (``'<module>:output'``).
    """
    modules = dict(model.named_modules())
    produced: Dict[int, tuple] = {}
    follows: Dict[str, str] = {}

    def after_conv(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if torch.is_tensor(out):
                produced[id(out)] = (name, out)
        return hook

    def before_norm(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            hit = produced.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                follows.setdefault(hit[0], name)
        return hook

    handles = [modules[n].register_forward_hook(after_conv(n))
               for n in convs]
    handles += [m.register_forward_pre_hook(before_norm(n))
                for n, m in modules.items()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    _run_hooked(handles, run)
    produced.clear()
    return {n: follows.get(n, n) for n in convs}


def _run_hooked(handles: Sequence[Any], run: Callable[[], Any]) -> None:
    """``run()`` without gradients, then remove the hooks' ``handles``."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


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
    """Running min/max, element count and a strided sample of one site's
    values."""

    def __init__(self) -> None:
        self.lo, self.hi = 0.0, 0.0
        self.samples: List[torch.Tensor] = []
        self.kept = 0
        self.elements = 0  # seen in all, over every forward

    def add(self, x: torch.Tensor) -> None:
        """Record ``x``, a live activation: the forward goes on after the
        hook and may rewrite it in place (``ReLU(inplace=True)``, a
        residual ``+=``), so what is kept is a copy. On the CPU
        ``.detach()``, ``.reshape()``, ``.float()``, a strided slice and
        ``.cpu()`` all return the same storage."""
        flat = x.detach().reshape(-1).float()
        self.elements += flat.numel()
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if self.kept < SAMPLE_PER_SITE:
            step = max(1, math.ceil(flat.numel() / SAMPLE_PER_BATCH))
            part = flat[::step].to('cpu', copy=True)
            self.samples.append(part)
            self.kept += part.numel()


@contextmanager
def observe_sites(sites: Mapping[str, nn.Module],
                  outputs: Optional[Mapping[str, nn.Module]] = None
                  ) -> Iterator[Dict[str, _Observer]]:
    """Inside the block, every forward of a site records its input values,
    and of a module in ``outputs`` its output (site ``'<name>:output'``).

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

    def output_hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            if torch.is_tensor(out):
                observers.setdefault(name + OUTPUT, _Observer()).add(out)
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, m in sites.items()]
    handles += [m.register_forward_hook(output_hook(n))
                for n, m in (outputs or {}).items()]
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
    """Fake-quantize the tensor of every site in ``ranges`` from now on
    (forward pre-hooks, and forward hooks for output sites, on the sites'
    modules); returns the hooks' handles.

    ``quantize(ranges[site], x)`` does it (default: :meth:`ActivationRange.
    fake_quantize`; the ONNX export passes one that exports as
    ``QuantizeLinear`` → ``DequantizeLinear``, :func:`captured_sites` one
    that records the tensor).
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

    def output_hook(name: str) -> Callable[..., Any]:
        def quantize_output(module: nn.Module, args: tuple, out: Any) -> Any:
            return quantize(ranges[name + OUTPUT], out) \
                if torch.is_tensor(out) else None
        return quantize_output

    inputs = {n.split(':')[0] for n in ranges if not n.endswith(OUTPUT)}
    outputs = {n[:-len(OUTPUT)] for n in ranges if n.endswith(OUTPUT)}
    return [sites[n].register_forward_pre_hook(hook(n), with_kwargs=True)
            for n in sites if n in inputs] + \
        [sites[n].register_forward_hook(output_hook(n))
         for n in sites if n in outputs]


@contextmanager
def captured_sites(sites: Mapping[str, nn.Module], names: Sequence[str]
                   ) -> Iterator[List[tuple]]:
    """Inside the block, each forward of a site in ``names`` appends
    ``(site, tensor)``: the tensor the site would quantize, part of the
    autograd graph (one that needs no gradient, e.g. the image, is replaced
    by a leaf that does), so gradients with respect to it can be taken.
    Each capture is an alias of its own (``view_as``): when two sites read
    one tensor (a block's input feeding a convolution and its downsample,
    a self-attention's query and key), each gradient is that of its own
    consumer's path, the one its quantizer would perturb.

    Args:
        sites (Mapping[str, nn.Module]): Module name → module of the sites.
        names (Sequence[str]): Site names to capture.

    Yields:
        list[tuple[str, Tensor]]: The captures, in forward order.
    """
    seen: List[tuple] = []

    def capture(site: str, x: torch.Tensor) -> torch.Tensor:
        x = x.view_as(x) if x.requires_grad else \
            x.detach().requires_grad_()
        seen.append((site, x))
        return x

    handles = attach_activation_quantizers(sites, {n: n for n in names},
                                           capture)
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def site_errors(sites: Mapping[str, nn.Module],
                ranges: Mapping[str, ActivationRange],
                run: Callable[[], Any]
                ) -> Dict[str, Tuple[float, float, float]]:
    """``(Σ ||Q(a) − a||², Σ ||a||², Σ ||clamp(a, lo, hi) − a||²)`` of every
    site over the forward passes of ``run()``: its quantization error, its
    signal and the part of its error that the range clips. Each is measured
    with every activation float, on the live tensor as the forward hands it
    to the site (so a range calibrated from wrong values shows here).
    """
    sums = {n: [0.0, 0.0, 0.0] for n in ranges}

    def measure(site: str, x: torch.Tensor) -> torch.Tensor:
        a, rng = x.detach(), ranges[site]
        for k, t in enumerate((rng.fake_quantize(a) - a, a,
                               a.clamp(rng.lo, rng.hi) - a)):
            sums[site][k] += float((t.double()**2).sum())
        return x

    _run_hooked(attach_activation_quantizers(
        sites, {n: n for n in ranges}, measure), run)
    return {n: tuple(v) for n, v in sums.items()}


def sqnr_db(error: float, energy: float) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ||a||² / Σ||Q(a) −
    a||²)`` in dB (inf for an exact site)."""
    if error <= 0:
        return math.inf
    return 10.0 * math.log10(max(energy, 1e-300) / error)


def site_macs(sites: Mapping[str, nn.Module],
              seen: Mapping[str, '_Observer'],
              outputs: Mapping[str, str]) -> Dict[str, int]:
    """Multiply-accumulates of the layer behind every input site over the
    observed forwards: ``Linear`` inputs × out features, attention inputs ×
    embed dims, ``Conv2d`` outputs (its output site's count) × in channels
    per group × kernel size. Output sites have none of their own.

    Args:
        sites (Mapping[str, nn.Module]): Module name → module.
        seen (Mapping[str, _Observer]): :func:`observe_sites`' observers.
        outputs (Mapping[str, str]): Convolution → output module
            (:func:`conv_output_modules`).
    """
    macs = {}
    for site, obs in seen.items():
        if site.endswith(OUTPUT):
            continue
        module = sites[site.split(':')[0]]
        if isinstance(module, nn.Linear):
            macs[site] = obs.elements * module.out_features
        elif isinstance(module, nn.MultiheadAttention):
            macs[site] = obs.elements * module.embed_dim
        elif isinstance(module, nn.Conv2d):
            out = seen.get(outputs.get(site, site) + OUTPUT)
            per = module.in_channels // module.groups * math.prod(
                module.kernel_size)
            macs[site] = (out.elements if out else 0) * per
    return macs


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

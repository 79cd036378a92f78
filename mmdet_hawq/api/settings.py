"""``QuantSettings``: every setting of a quantization run, one typed object
checked once, when it is built.

A bad value stops with one :class:`~mmdet_hawq.errors.HawqUserError` line
naming the setting and the fix, before any model or data is touched. The
hook builds it from its config keys (:meth:`QuantSettings.from_kwargs`);
:func:`~mmdet_hawq.api.quantize` reads it and nothing else.
"""
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..allocation import NEGATIVE_POLICIES
from ..errors import HawqUserError
from ..models import DISTILLATION_DEFAULTS
from ..quant import (DEFAULT_EXCLUDE, ROUNDINGS, PrecisionPlan, check_bits,
                     load_plan)
from ..quant.activations import RANGE_METHODS
from .critical import check_critical_form

METRICS = ('uniform', 'plan', 'losssen', 'outfloat', 'outquant')
#: The metrics that compute Hessian traces and solve the ILP.
SENSITIVITY_METRICS = ('losssen', 'outfloat', 'outquant')
ESTIMATORS = ('hutchinson', 'hutchinson_per_layer', 'gauss_newton')
#: Defaults of the ``sensitivity`` settings.
SENSITIVITY_DEFAULTS = dict(
    estimator=None,  # None: 'gauss_newton' for outfloat/outquant,
    #                  'hutchinson' for losssen (the only one it has)
    num_images=100,
    batch_size=4,
    seed=0,
    tol=0.05,
    min_samples=10,
    max_samples=100,
    lambda_kl=None,  # None: by the class head (models.DISTILLATION_DEFAULTS)
    temperature=None,
    decoder_layers=None,
    proposals=False,  # two-stage models: also distil the encoder
    #                   proposals (models.distillation_outputs)
    negative_traces='ucb',
    use_cache=True,
    cache_dir=None,  # None: the caller's (the hook: <out_dir>/cache)
    dataset=None,  # None: the train split with the test pipeline
    critical_classes=None,  # None: every class; else names of the dataset's
    #                         classes the KL term is restricted to
)
#: The settings that choose the calibration images.
CALIBRATION_KEYS = ('num_images', 'batch_size', 'seed', 'dataset')
#: Defaults of the ``gptq`` settings.
GPTQ_DEFAULTS = dict(
    damp=0.01,  # λ = damp · mean(diag H) added to the diagonal
    act_order=False,  # columns by descending diag(H)
    block_size=128,  # columns per lazy-update block (same codes)
    sequential=False,  # True: each weight's H from the partly quantized
    #                    model (one pass per stage; as good and 4-23x
    #                    slower on the small models, see docs/results.md)
    stage_size=1,  # weights per pass over the calibration set
    error_terms='nearest',  # ILP error terms: 'nearest' (||Q_b(W) - W||²)
    #                         or 'gptq' (times GPTQ's output-error ratio)
)
ERROR_TERMS = ('nearest', 'gptq')
#: Defaults of the ``activations`` settings (None: activations stay float).
ACTIVATION_DEFAULTS = dict(
    bits=8,  # unsigned codes per tensor (ONNX Runtime's QDQ activations)
    method='mse',  # range: 'minmax', 'percentile' or 'mse'
    sensitivity=False,  # per-site GN trace x error (activation_sites.json)
    int8_macs=None,  # share of the quantized layers' MACs with int8
    #                  inputs: the least damaging sites are chosen (needs
    #                  sensitivity); None: every site not in float_sites
    float_sites=(),  # site name patterns (fnmatch) kept float
)


@dataclass
class QuantSettings:
    """Every setting of one quantization run, checked when built.

    Args:
        metric (str): How bit-widths are chosen: ``'uniform'`` (``bits``
            for every weight), ``'plan'`` (read ``plan_file``), ``'losssen'``
            (Hessian of the DETR loss), ``'outfloat'`` (distillation Hessian
            at the float weights) or ``'outquant'`` (distillation Hessian at
            the 8-bit weights, the paper's method). Defaults to 'outquant'.
        bits (int, optional): Bit-width of ``'uniform'``.
        plan_file (str, optional): JSON plan of ``'plan'``; entries that
            give only bits take ``per_channel`` and ``rounding`` from here.
        target_bits (float, optional): Average bit-width budget of the
            sensitivity metrics.
        bit_range (Sequence[int]): Fewest and most bits of a layer.
            Defaults to (3, 6), the paper's range for 4 and 5 bits.
        sensitivity (dict, optional): Sensitivity settings, see
            :data:`SENSITIVITY_DEFAULTS`; resolved in place (defaults
            merged, the estimator chosen).
        include (Sequence[str], optional): Only weights matching these glob
            patterns are quantized. Defaults to None (all candidates).
        exclude (Sequence[str]): Glob patterns of weights kept in float on
            top of the head's final class and box FFNs.
        min_bits (dict, optional): Glob pattern → fewest bits the ILP may
            give; None: the model's structural floors
            (:func:`~mmdet_hawq.models.default_min_bits`), ``{}``: none.
        per_channel (bool): Per-output-channel scales instead of the
            paper's per-tensor ones. Defaults to False.
        rounding (str): ``'nearest'`` (the paper's) or ``'gptq'``.
        gptq (dict, optional): GPTQ settings, see :data:`GPTQ_DEFAULTS`;
            only with ``rounding='gptq'``; resolved in place.
        activations (dict, optional): Quantize the inputs of the quantized
            layers too (:mod:`~mmdet_hawq.quant.activations`), with ranges
            from the calibration images; see :data:`ACTIVATION_DEFAULTS`;
            resolved in place. Defaults to None: activations stay float.
    """

    metric: str = 'outquant'
    bits: Optional[int] = None
    plan_file: Optional[str] = None
    target_bits: Optional[float] = None
    bit_range: Tuple[int, int] = (3, 6)
    sensitivity: Optional[Dict[str, Any]] = None
    include: Optional[Sequence[str]] = None
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    min_bits: Optional[Dict[str, int]] = None
    per_channel: bool = False
    rounding: str = 'nearest'
    gptq: Optional[Dict[str, Any]] = None
    activations: Optional[Dict[str, Any]] = None
    #: The plan read from ``plan_file`` (``metric='plan'``).
    plan: Optional[PrecisionPlan] = field(default=None, init=False,
                                          repr=False)

    def __post_init__(self) -> None:
        self.bit_range = check_bit_range(self.bit_range)
        if self.metric not in METRICS:
            raise HawqUserError(
                f'metric {self.metric!r} is unknown: use one of '
                f'{", ".join(METRICS)}')
        if self.metric == 'uniform':
            if self.bits is None:
                raise HawqUserError(
                    "metric='uniform' needs bits=N (2 to 8)")
            check_bits(self.bits, 'bits')
        if self.metric == 'plan' and not self.plan_file:
            raise HawqUserError("metric='plan' needs plan_file=PATH")
        self.gptq = resolve_gptq(self.rounding, self.gptq)
        if self.metric == 'plan':
            self.plan = load_plan(self.plan_file, self.axis, self.rounding)
        if self.metric in SENSITIVITY_METRICS:
            if self.target_bits is None:
                raise HawqUserError(
                    f"metric='{self.metric}' needs target_bits (the average "
                    'bit-width budget)')
            low, high = self.bit_range
            check_bits(low, 'bit_range low end')
            check_bits(high, 'bit_range high end')
            if low > high:
                raise HawqUserError(
                    f'bit_range {self.bit_range} is empty: give (low, high) '
                    'with low <= high')
            check_budget(self.target_bits, low, high)
        self.sensitivity = resolve_sensitivity(self.metric, self.sensitivity)
        self.activations = resolve_activations(self.activations)
        check_min_bits(self.min_bits, self.metric, self.bit_range)
        self.exclude = tuple(self.exclude)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any],
                    owner: str = 'QuantSettings',
                    own: Sequence[str] = ()) -> 'QuantSettings':
        """Settings from keyword arguments (e.g. a hook's config keys); an
        unknown name stops with one line naming the closest valid one.

        Args:
            kwargs (Mapping): Setting name → value.
            owner (str): What takes the arguments, for the message.
                Defaults to 'QuantSettings'.
            own (Sequence[str]): The owner's other arguments (valid names
                that are not settings). Defaults to ().
        """
        valid = setting_names() + list(own)
        for name in sorted(kwargs):
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f'did you mean {close[0]!r}? ' if close else ''
                raise HawqUserError(
                    f'{owner}: unknown argument {name!r}: {hint}the valid '
                    f'ones are {", ".join(valid)}')
        return cls(**kwargs)

    @property
    def axis(self) -> Optional[int]:
        """0 for per-channel scales, None for per tensor."""
        return 0 if self.per_channel else None

    @property
    def uses_traces(self) -> bool:
        """Whether the bits come from Hessian traces and the ILP."""
        return self.metric in SENSITIVITY_METRICS

    @property
    def reads_calibration(self) -> bool:
        """Whether the run reads calibration images (the sensitivity
        metrics, GPTQ rounding)."""
        return self.uses_traces or self.rounding == 'gptq' or \
            self.activations is not None

    @property
    def calibration(self) -> Dict[str, Any]:
        """The settings that choose the calibration images
        (:data:`CALIBRATION_KEYS`)."""
        return {k: self.sensitivity[k] for k in CALIBRATION_KEYS}

    def distillation(self, activation: str) -> Tuple[float, float]:
        """(λ_KL, T) of the distillation loss: the user's, else the
        defaults of the class head's ``activation``."""
        lambda_kl, temperature = DISTILLATION_DEFAULTS[activation]
        s = self.sensitivity
        return (lambda_kl if s['lambda_kl'] is None else s['lambda_kl'],
                temperature if s['temperature'] is None else
                s['temperature'])


def setting_names() -> List[str]:
    """The names :class:`QuantSettings` takes."""
    return [f.name for f in fields(QuantSettings) if f.init]


def check_bit_range(bit_range: Any) -> Tuple[Any, Any]:
    """``bit_range`` as ``(low, high)``, or one line saying it is not a
    pair (each end is checked by :func:`~mmdet_hawq.quant.check_bits`)."""
    if isinstance(bit_range, (str, bytes)) or not isinstance(
            bit_range, Sequence) or len(bit_range) != 2:
        raise HawqUserError(
            f'bit_range {bit_range!r} is not a pair: give (low, high), e.g. '
            '(3, 6)')
    return bit_range[0], bit_range[1]


def check_budget(target_bits: Any, low: int, high: int) -> None:
    """Raise unless ``target_bits`` is a number the bit range can meet."""
    if isinstance(target_bits, bool) or not isinstance(
            target_bits, (int, float)) or not math.isfinite(target_bits):
        raise HawqUserError(
            f'target_bits {target_bits!r} is not a finite number: give the '
            'average bit-width budget, e.g. 4 or 4.5')
    if target_bits < low:
        raise HawqUserError(
            f'target_bits={target_bits} is below the lowest bit-width of '
            f'bit_range=({low}, {high}): no plan can average {target_bits} '
            f'bits; raise target_bits to at least {low} or lower the '
            'bit_range low end')


def check_min_bits(min_bits: Any, metric: str,
                   bit_range: Tuple[int, int]) -> None:
    """Raise unless ``min_bits`` maps patterns to bit-widths inside
    ``bit_range``, for a metric that allocates bits."""
    if not min_bits:
        return
    if metric not in SENSITIVITY_METRICS:
        raise HawqUserError(
            f'min_bits bounds the ILP of the sensitivity metrics; '
            f"metric='{metric}' has none: drop min_bits or use "
            "metric='outquant'")
    if not isinstance(min_bits, dict):
        raise HawqUserError(
            f'min_bits {min_bits!r} is not a dict: give {{pattern: bits}}, '
            "e.g. {'backbone.*': 4}")
    low, high = bit_range
    for pattern, bits in min_bits.items():
        if not isinstance(pattern, str) or isinstance(bits, bool) or \
                not isinstance(bits, int) or not low <= bits <= high:
            raise HawqUserError(
                f'min_bits entry {pattern!r}: {bits!r} is not a bit-width in '
                f'bit_range {bit_range}: give a weight pattern and an int '
                f'from {low} to {high}')


def resolve_activations(settings: Any) -> Optional[dict]:
    """The ``activations`` settings merged with
    :data:`ACTIVATION_DEFAULTS`, checked (None stays None)."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise HawqUserError(
            f'activations {settings!r} is not a dict: give e.g. '
            "dict(bits=8, method='mse'), or None to keep them float")
    unknown = set(settings) - set(ACTIVATION_DEFAULTS)
    if unknown:
        raise HawqUserError(
            f'unknown activations setting(s) {sorted(unknown)}: the known '
            f'ones are {sorted(ACTIVATION_DEFAULTS)}')
    s = dict(ACTIVATION_DEFAULTS, **settings)
    check_bits(s['bits'], 'activations bits')
    if s['method'] not in RANGE_METHODS:
        raise HawqUserError(
            f"activations method {s['method']!r} is unknown: use one of "
            f'{", ".join(RANGE_METHODS)}')
    share = s['int8_macs']
    if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float))
            or not 0.0 <= share <= 1.0):
        raise HawqUserError(
            f'activations int8_macs={share!r} is not a share of the MACs: '
            'give a number from 0 to 1, or leave it out to quantize every '
            'site not in float_sites')
    if share is not None and share < 1.0 and not s['sensitivity']:
        raise HawqUserError(
            f'activations int8_macs={share} chooses sites by their '
            'measured damage: pass sensitivity=True too')
    if isinstance(s['float_sites'], str) or not all(
            isinstance(p, str) for p in s['float_sites']):
        raise HawqUserError(
            f"activations float_sites {s['float_sites']!r} is not a list of "
            "site name patterns: give e.g. ['*sampling_offsets*']")
    s['float_sites'] = list(s['float_sites'])
    s['sensitivity'] = bool(s['sensitivity'])
    s['int8_macs'] = None if share is None else float(share)
    return s


def resolve_gptq(rounding: str, settings: Optional[dict]) -> dict:
    """The ``gptq`` settings merged with :data:`GPTQ_DEFAULTS`, checked.

    Raises:
        HawqUserError: An unknown rounding, setting or value.
    """
    if rounding not in ROUNDINGS:
        raise HawqUserError(
            f'rounding {rounding!r} is unknown: use one of '
            f'{", ".join(ROUNDINGS)}')
    if settings and rounding != 'gptq':
        raise HawqUserError(
            f"gptq settings are given but rounding is {rounding!r}: pass "
            "rounding='gptq' or drop gptq")
    s = dict(GPTQ_DEFAULTS)
    unknown = set(settings or {}) - set(s)
    if unknown:
        raise HawqUserError(
            f'unknown gptq setting(s) {sorted(unknown)}: the known ones are '
            f'{sorted(s)}')
    s.update(settings or {})
    if s['error_terms'] not in ERROR_TERMS:
        raise HawqUserError(
            f"gptq error_terms {s['error_terms']!r} is unknown: use one of "
            f'{", ".join(ERROR_TERMS)}')
    for key in ('block_size', 'stage_size'):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or \
                s[key] < 1:
            raise HawqUserError(
                f'gptq {key} {s[key]!r} is not a positive int')
    if isinstance(s['damp'], bool) or not isinstance(
            s['damp'], (int, float)) or not 0 <= s['damp'] < 1:
        raise HawqUserError(
            f"gptq damp {s['damp']!r} is not a number in [0, 1): GPTQ uses "
            '0.01')
    return s


def resolve_sensitivity(metric: str, settings: Optional[dict]) -> dict:
    """Defaults merged with the user's sensitivity settings, checked (the
    estimator chosen for the metric)."""
    s = dict(SENSITIVITY_DEFAULTS)
    if settings is not None and not isinstance(settings, dict):
        raise HawqUserError(
            f'sensitivity {settings!r} is not a dict: give the settings as '
            'a dict, e.g. dict(num_images=100)')
    unknown = set(settings or {}) - set(s)
    if unknown:
        raise HawqUserError(
            f'unknown sensitivity setting(s) {sorted(unknown)}: the known '
            f'ones are {sorted(s)}')
    s.update(settings or {})
    if s['estimator'] is None:
        s['estimator'] = 'hutchinson' if metric == 'losssen' else \
            'gauss_newton'
    if s['estimator'] not in ESTIMATORS:
        raise HawqUserError(
            f"sensitivity estimator {s['estimator']!r} is unknown: use one "
            f'of {", ".join(ESTIMATORS)}')
    if metric == 'losssen' and s['estimator'] == 'gauss_newton':
        raise HawqUserError(
            "metric 'losssen' has no Gauss-Newton form (Hungarian matching, "
            "GIoU): use estimator='hutchinson'")
    check_setting_values(s, list(settings or {}))
    s['critical_classes'] = check_critical_form(s['critical_classes'],
                                                metric)
    return s


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_setting_values(s: dict, given: Sequence[str] = ()) -> None:
    """Raise unless the sensitivity settings' values are usable.

    Args:
        s (dict): The settings, defaults merged in.
        given (Sequence[str]): The names the user set. A ``max_samples``
            below the default ``min_samples`` caps it; one below a
            ``min_samples`` the user gave is an error. Defaults to ().

    Raises:
        HawqUserError: One line naming the setting, its value and what to
            give instead.
    """
    def bad(name: str, want: str) -> HawqUserError:
        return HawqUserError(
            f'sensitivity setting {name}={s[name]!r} is not valid: give '
            f'{want}')

    for name in ('num_images', 'batch_size', 'min_samples', 'max_samples'):
        if not _is_int(s[name]) or s[name] < 1:
            raise bad(name, 'an integer of at least 1')
    if 'min_samples' in given and s['min_samples'] > s['max_samples']:
        raise HawqUserError(
            f"sensitivity settings min_samples={s['min_samples']} and "
            f"max_samples={s['max_samples']} do not fit: give min_samples "
            '<= max_samples')
    if not _is_int(s['seed']):
        raise bad('seed', 'an integer')
    if not _is_number(s['tol']) or s['tol'] < 0:
        raise bad('tol', 'a number >= 0 (the relative standard error at '
                  'which sampling stops; 0: always max_samples)')
    for name in ('lambda_kl', 'temperature'):
        if s[name] is not None and (
                not _is_number(s[name]) or s[name] < 0 or
                (name == 'temperature' and s[name] == 0)):
            raise bad(name, 'a number > 0' if name == 'temperature' else
                      'a number >= 0')
    if s['negative_traces'] not in NEGATIVE_POLICIES:
        raise bad('negative_traces', f'one of {", ".join(NEGATIVE_POLICIES)}')
    for name in ('use_cache', 'proposals'):
        if not isinstance(s[name], bool):
            raise bad(name, 'True or False')
    layers = s['decoder_layers']
    if layers is not None and (
            isinstance(layers, (str, bytes)) or
            not isinstance(layers, (list, tuple)) or
            not layers or not all(_is_int(i) for i in layers)):
        raise bad('decoder_layers', 'None (every decoder layer) or a list '
                  'of decoder layer indices')
    if s['cache_dir'] is not None and not isinstance(s['cache_dir'], str):
        raise bad('cache_dir', 'None or a folder path')
    if s['dataset'] is not None and not isinstance(s['dataset'], dict):
        raise bad('dataset', 'None (the train split) or a dataset config '
                  'dict')

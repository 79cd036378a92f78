"""``QuantSettings``: every setting of a quantization run, one typed object
checked once, when it is built.

A bad value stops with one :class:`~mmdet_hawq.errors.HawqUserError` line
naming the setting and the fix, before any model or data is touched. The
hook builds it from its config keys (:meth:`QuantSettings.from_kwargs`);
:func:`~mmdet_hawq.api.quantize` reads it and nothing else.
"""
import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import (Any, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Type, TypeVar)

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
ERROR_TERMS = ('nearest', 'gptq')
T = TypeVar('T')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def typed(cls: Type[T], value: Any, name: str, example: str) -> T:
    """``value`` as a ``cls``: an instance as it is, a dict of its fields
    (a config's form), None: the defaults.

    Raises:
        HawqUserError: Not a dict, or a key that is not a field.
    """
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise HawqUserError(
            f'{name} {value!r} is not a dict: give the settings as a dict, '
            f'e.g. {example}')
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        moved = [k for k in unknown if name == 'sensitivity'
                 and k in [f.name for f in fields(CalibrationSettings)]]
        if moved:
            raise HawqUserError(
                f'{moved[0]} is a calibration setting, not a sensitivity '
                f'one: pass calibration=dict({moved[0]}=...)')
        raise HawqUserError(
            f'unknown {name} setting(s) {unknown}: the known ones are '
            f'{sorted(known)}')
    return cls(**value)


@dataclass
class CalibrationSettings:
    """Which calibration images a run reads (the sensitivity step, GPTQ
    and the activation ranges share them), and the seed of its random
    draws.

    Args:
        num_images (int): How many images, chosen to match the split's
            class distribution. Defaults to 100.
        batch_size (int): Images per batch. Defaults to 4.
        seed (int): Seed of the choice and of the estimators' random
            draws. Defaults to 0.
        dataset (dict, optional): A dataset config; None: the train split
            with the test pipeline.
    """

    num_images: int = 100
    batch_size: int = 4
    seed: int = 0
    dataset: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        for name in ('num_images', 'batch_size'):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise self.bad(name, 'an integer of at least 1')
        if not _is_int(self.seed):
            raise self.bad('seed', 'an integer')
        if self.dataset is not None and not isinstance(self.dataset, dict):
            raise self.bad('dataset', 'None (the train split) or a dataset '
                           'config dict')

    def bad(self, name: str, want: str) -> HawqUserError:
        return HawqUserError(
            f'calibration setting {name}={getattr(self, name)!r} is not '
            f'valid: give {want}')


@dataclass
class SensitivitySettings:
    """How the Hessian traces are estimated and read.

    Args:
        estimator (str, optional): ``'gauss_newton'``, ``'hutchinson'`` or
            ``'hutchinson_per_layer'``; None: Gauss-Newton for
            outfloat/outquant, Hutchinson for losssen (its only one).
        tol (float): Relative standard error at which sampling stops
            (0: always ``max_samples``). Defaults to 0.05.
        min_samples (int): Fewest samples; a ``max_samples`` below the
            default caps it. Defaults to 10.
        max_samples (int): Most samples. Defaults to 100.
        lambda_kl (float, optional): Weight of the KL term; None: by the
            class head (:data:`~mmdet_hawq.models.DISTILLATION_DEFAULTS`).
        temperature (float, optional): Softmax temperature; likewise.
        decoder_layers (list[int], optional): Decoder layers distilled;
            None: every one.
        proposals (bool): Two-stage models: also distil the encoder
            proposals. Defaults to False.
        negative_traces (str): How negative traces are read. Defaults to
            'ucb'.
        use_cache (bool): Save and resume the samples. Defaults to True.
        cache_dir (str, optional): Where; None: the caller's (the hook:
            ``<out_dir>/cache``).
        critical_classes (list[str], optional): Names of the dataset's
            classes the KL term is restricted to; None: every class.
    """

    estimator: Optional[str] = None
    tol: float = 0.05
    min_samples: int = 10
    max_samples: int = 100
    lambda_kl: Optional[float] = None
    temperature: Optional[float] = None
    decoder_layers: Optional[Sequence[int]] = None
    proposals: bool = False
    negative_traces: str = 'ucb'
    use_cache: bool = True
    cache_dir: Optional[str] = None
    critical_classes: Optional[Sequence[str]] = None

    def resolved(self, metric: str, given: Sequence[str] = ()
                 ) -> 'SensitivitySettings':
        """These settings checked for ``metric``, the estimator chosen.

        Args:
            metric (str): The run's metric.
            given (Sequence[str]): The names the user set. A
                ``max_samples`` below the default ``min_samples`` caps it;
                one below a ``min_samples`` the user gave is an error.
                Defaults to ().
        """
        estimator = self.estimator or (
            'hutchinson' if metric == 'losssen' else 'gauss_newton')
        if estimator not in ESTIMATORS:
            raise HawqUserError(
                f'sensitivity estimator {estimator!r} is unknown: use one '
                f'of {", ".join(ESTIMATORS)}')
        if metric == 'losssen' and estimator == 'gauss_newton':
            raise HawqUserError(
                "metric 'losssen' has no Gauss-Newton form (Hungarian "
                "matching, GIoU): use estimator='hutchinson'")
        if 'min_samples' in given and self.min_samples > self.max_samples:
            raise HawqUserError(
                f'sensitivity settings min_samples={self.min_samples} and '
                f'max_samples={self.max_samples} do not fit: give '
                'min_samples <= max_samples')
        return replace(self, estimator=estimator,
                       critical_classes=check_critical_form(
                           self.critical_classes, metric))

    def bad(self, name: str, want: str) -> HawqUserError:
        return HawqUserError(
            f'sensitivity setting {name}={getattr(self, name)!r} is not '
            f'valid: give {want}')

    def __post_init__(self) -> None:
        """Raise unless the values are usable (one line naming the
        setting, its value and what to give instead)."""
        for name in ('min_samples', 'max_samples'):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise self.bad(name, 'an integer of at least 1')
        if not _is_number(self.tol) or self.tol < 0:
            raise self.bad('tol', 'a number >= 0 (the relative standard '
                           'error at which sampling stops; 0: always '
                           'max_samples)')
        for name in ('lambda_kl', 'temperature'):
            value = getattr(self, name)
            if value is not None and (
                    not _is_number(value) or value < 0 or
                    (name == 'temperature' and value == 0)):
                raise self.bad(name, 'a number > 0' if name == 'temperature'
                               else 'a number >= 0')
        if self.negative_traces not in NEGATIVE_POLICIES:
            raise self.bad('negative_traces',
                           f'one of {", ".join(NEGATIVE_POLICIES)}')
        for name in ('use_cache', 'proposals'):
            if not isinstance(getattr(self, name), bool):
                raise self.bad(name, 'True or False')
        layers = self.decoder_layers
        if layers is not None and (
                isinstance(layers, (str, bytes)) or
                not isinstance(layers, (list, tuple)) or
                not layers or not all(_is_int(i) for i in layers)):
            raise self.bad('decoder_layers', 'None (every decoder layer) or '
                           'a list of decoder layer indices')
        if self.cache_dir is not None and not isinstance(self.cache_dir,
                                                         str):
            raise self.bad('cache_dir', 'None or a folder path')


@dataclass
class GptqSettings:
    """GPTQ rounding (``rounding='gptq'``).

    Args:
        damp (float): λ = damp · mean(diag H) added to the diagonal.
            Defaults to 0.01.
        act_order (bool): Columns by descending diag(H). Defaults to False.
        block_size (int): Columns per lazy-update block (same codes).
            Defaults to 128.
        sequential (bool): Each weight's H from the partly quantized model
            (one pass per stage; as good and 4-23x slower on the small
            models, see docs/results.md). Defaults to False.
        stage_size (int): Weights per pass over the calibration set.
            Defaults to 1.
        error_terms (str): The ILP's error terms: ``'nearest'``
            (||Q_b(W) - W||²) or ``'gptq'`` (times GPTQ's output-error
            ratio). Defaults to 'nearest'.
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    sequential: bool = False
    stage_size: int = 1
    error_terms: str = 'nearest'

    def __post_init__(self) -> None:
        if self.error_terms not in ERROR_TERMS:
            raise HawqUserError(
                f'gptq error_terms {self.error_terms!r} is unknown: use one '
                f'of {", ".join(ERROR_TERMS)}')
        for key in ('block_size', 'stage_size'):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise HawqUserError(
                    f'gptq {key} {getattr(self, key)!r} is not a positive '
                    'int')
        if isinstance(self.damp, bool) or not isinstance(
                self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise HawqUserError(
                f'gptq damp {self.damp!r} is not a number in [0, 1): GPTQ '
                'uses 0.01')


@dataclass
class ActivationSettings:
    """8-bit activations: the inputs of the quantized layers, with ranges
    from the calibration images (:mod:`~mmdet_hawq.quant.activations`).

    Args:
        bits (int): Unsigned code bits per tensor (ONNX Runtime's QDQ
            activations). Defaults to 8.
        method (str): Range: ``'minmax'``, ``'percentile'`` or ``'mse'``.
            Defaults to 'mse'.
        sensitivity (bool): Per-site Gauss-Newton trace x error
            (``activation_sites.json``). Defaults to False.
        int8_macs (float, optional): Share of the quantized layers' MACs
            with int8 inputs: the least damaging sites are chosen (needs
            ``sensitivity``); None: every site not in ``float_sites``.
        float_sites (list[str]): Site name patterns (fnmatch) kept float.
            Defaults to ().
    """

    bits: int = 8
    method: str = 'mse'
    sensitivity: bool = False
    int8_macs: Optional[float] = None
    float_sites: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_bits(self.bits, 'activations bits')
        if self.method not in RANGE_METHODS:
            raise HawqUserError(
                f'activations method {self.method!r} is unknown: use one of '
                f'{", ".join(RANGE_METHODS)}')
        share = self.int8_macs
        if share is not None and (
                isinstance(share, bool) or not isinstance(share, (int, float))
                or not 0.0 <= share <= 1.0):
            raise HawqUserError(
                f'activations int8_macs={share!r} is not a share of the '
                'MACs: give a number from 0 to 1, or leave it out to '
                'quantize every site not in float_sites')
        if share is not None and share < 1.0 and not self.sensitivity:
            raise HawqUserError(
                f'activations int8_macs={share} chooses sites by their '
                'measured damage: pass sensitivity=True too')
        if isinstance(self.float_sites, str) or not all(
                isinstance(p, str) for p in self.float_sites):
            raise HawqUserError(
                f'activations float_sites {self.float_sites!r} is not a list '
                "of site name patterns: give e.g. ['*sampling_offsets*']")
        self.float_sites = list(self.float_sites)
        self.sensitivity = bool(self.sensitivity)
        self.int8_macs = None if share is None else float(share)


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
        sensitivity (SensitivitySettings or dict, optional): How the traces
            are estimated; a dict of its fields is taken too (a config's
            form). Resolved when built (the estimator chosen).
        calibration (CalibrationSettings or dict, optional): Which
            calibration images the run reads, and the seed.
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
        gptq (GptqSettings or dict, optional): GPTQ's settings; only with
            ``rounding='gptq'``.
        activations (ActivationSettings or dict, optional): Quantize the
            inputs of the quantized layers too, with ranges from the
            calibration images. Defaults to None: activations stay float.
    """

    metric: str = 'outquant'
    bits: Optional[int] = None
    plan_file: Optional[str] = None
    target_bits: Optional[float] = None
    bit_range: Tuple[int, int] = (3, 6)
    sensitivity: Optional[SensitivitySettings] = None
    calibration: Optional[CalibrationSettings] = None
    include: Optional[Sequence[str]] = None
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    min_bits: Optional[Dict[str, int]] = None
    per_channel: bool = False
    rounding: str = 'nearest'
    gptq: Optional[GptqSettings] = None
    activations: Optional[ActivationSettings] = None
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
        if self.rounding not in ROUNDINGS:
            raise HawqUserError(
                f'rounding {self.rounding!r} is unknown: use one of '
                f'{", ".join(ROUNDINGS)}')
        if self.gptq and self.rounding != 'gptq' and \
                self.gptq != GptqSettings():
            raise HawqUserError(
                f"gptq settings are given but rounding is {self.rounding!r}: "
                "pass rounding='gptq' or drop gptq")
        self.gptq = typed(GptqSettings, self.gptq, 'gptq',
                          'dict(act_order=True)')
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
        # the names the user set (a typed object: those off their default)
        given = list(self.sensitivity) if isinstance(
            self.sensitivity, Mapping) else [
                f.name for f in fields(SensitivitySettings)
                if isinstance(self.sensitivity, SensitivitySettings) and
                getattr(self.sensitivity, f.name) != f.default]
        self.sensitivity = typed(
            SensitivitySettings, self.sensitivity, 'sensitivity',
            'dict(max_samples=20)').resolved(self.metric, given)
        self.calibration = typed(CalibrationSettings, self.calibration,
                                 'calibration', 'dict(num_images=100)')
        if self.activations is not None:
            self.activations = typed(
                ActivationSettings, self.activations, 'activations',
                "dict(bits=8, method='mse'), or None to keep them float")
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

    def distillation(self, activation: str) -> Tuple[float, float]:
        """(λ_KL, T) of the distillation loss: the user's, else the
        defaults of the class head's ``activation``."""
        lambda_kl, temperature = DISTILLATION_DEFAULTS[activation]
        s = self.sensitivity
        return (lambda_kl if s.lambda_kl is None else s.lambda_kl,
                temperature if s.temperature is None else s.temperature)

    def trace_cache(self, default: Optional[str]) -> Optional[str]:
        """Where the trace samples are saved: the ``cache_dir`` setting,
        else the caller's ``default``; None with ``use_cache=False``."""
        if not self.sensitivity.use_cache:
            return None
        return self.sensitivity.cache_dir or default

    def trace_settings(self) -> Dict[str, Any]:
        """The sensitivity and calibration settings as one dict (what the
        trace cache key is made of, :func:`~.traces.cache_key`)."""
        return dict(asdict(self.sensitivity), **asdict(self.calibration))


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

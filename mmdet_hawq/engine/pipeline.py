"""Sensitivity → allocation for the hook: the mmengine-facing glue.

Steps (each in its own module): the detector's family facts (:mod:`..models.
family`) → calibration set (:mod:`..sensitivity.calibration`) → frozen float
teacher → student at float or 8-bit weights → per-layer traces
(:mod:`..sensitivity.hutchinson` or :mod:`..sensitivity.gauss_newton`, cached
by :mod:`..sensitivity.cache`) → which zero-trace weights still change the
outputs (:mod:`..sensitivity.influence`) → error terms
(:mod:`..quant.quantizer`) → ILP (:mod:`..allocation.ilp`).

In a distributed run every rank takes its share of the calibration batches
and the trace samples are all-reduced (:mod:`..sensitivity.sharding`); the
cache is read and written, and the ILP solved, on rank 0 only (:mod:`.dist`).
"""
import copy
import os.path as osp
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.dataset import pseudo_collate
from mmengine.dist import is_main_process
from mmengine.runner import CheckpointLoader
from torch.utils.data import DataLoader, Subset

from mmdet.registry import DATASETS, MODELS
from ..allocation import (NEGATIVE_POLICIES, pareto_sweep,
                          sensitivities_from_traces, solve_allocation)
from ..allocation.ilp import round_significant
from ..errors import HawqUserError
from ..models import (DISTILLATION_DEFAULTS, class_activation,
                      decoder_outputs, detector_family, distillation_outputs)
from ..quant import (error_terms, fake_quantize, quantize_weights_,
                     uniform_plan)
from ..sensitivity import (DetrLossObjective, DistillationObjective,
                           TraceResult, cache_path, file_sha256,
                           gauss_newton_traces, hessian_mode,
                           hutchinson_traces, key_hash, load_cached,
                           output_influence, preprocess_batches, save_cached,
                           select_calibration_indices)
from .checkpoint import is_local_path, prepare_state_dict
from .critical import check_critical_form, critical_indices, declared_classes
from .dist import process_shard, run_on_main

#: Defaults of the ``sensitivity`` dict of ``DistillSensitivityHook``.
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
    #                   proposals (models.family.distillation_outputs)
    negative_traces='ucb',
    use_cache=True,
    cache_dir=None,  # None: <work_dir>/<out_subdir>/cache
    dataset=None,  # None: the train split with the test pipeline
    critical_classes=None,  # None: every class; else names of the dataset's
    #                         classes the KL term is restricted to
    #                         (sensitivity.critical, engine.critical)
)
ESTIMATORS = ('hutchinson', 'hutchinson_per_layer', 'gauss_newton')
#: Settings that enter the trace cache key only away from these values (at
#: them the traces are those of before the setting existed).
OMITTED_AT_DEFAULT = dict(critical_classes=None)
#: Settings the keys of older releases did not have: a cache written then
#: is still read when the settings are at these values.
OLDER_KEYS_WITHOUT = dict(proposals=False)
#: Version of how random draws are seeded (part of the cache key): 2 = one
#: generator per (sample, batch), the same in every process; 3 = sigmoid
#: heads' Rademacher draws, seeded loss inputs.
DRAWS_VERSION = 3
#: Calibration batches on which zero-trace weights are tested for influence.
INFLUENCE_BATCHES = 2
#: The first fix of a missing data file, in the data checks' messages.
MAKE_DATA = 'make the data (`make data` for the shapes benchmark)'


def check_detector_type(model_cfg: dict) -> None:
    """Stop a config whose detector is not a supported DETR-family type,
    before anything is built.

    Args:
        model_cfg (dict): The config's ``model`` (its ``type``: a name in
            mmdet's registry, or the class).

    Raises:
        HawqUserError: Neither the type nor a base class of it is in
            :data:`~mmdet_hawq.models.family.FAMILIES`
            (:func:`~mmdet_hawq.models.detector_family`). An unregistered
            type is left to mmengine's own error.
    """
    kind = model_cfg.get('type')
    cls = kind if isinstance(kind, type) else MODELS.get(kind)
    if cls is not None:
        detector_family(cls)


def _dataset_files(ds_cfg: dict) -> Tuple[Optional[str], Optional[str]]:
    """The annotation file and image folder a dataset config reads, joined
    with its ``data_root`` as mmengine's ``BaseDataset`` does (None where
    the config has none, or names another storage backend)."""
    root = ds_cfg.get('data_root') or ''

    def local(path: Optional[str]) -> Optional[str]:
        if not isinstance(path, str):
            return None
        full = osp.join(root, path)  # an absolute path stays as it is
        return full if full and is_local_path(full) else None

    ann_file = ds_cfg.get('ann_file')
    return (local(ann_file) if ann_file else None,
            local((ds_cfg.get('data_prefix') or {}).get('img')))


def check_data_files(cfg, calibration: Optional[dict] = None) -> None:
    """The annotation file and image folder of the test split, and of the
    calibration set when the hook reads one, exist; no annotation is read.

    Args:
        cfg (mmengine.Config): The run's config.
        calibration (dict, optional): The hook's ``sensitivity`` settings
            when it reads calibration images (the sensitivity metrics,
            GPTQ rounding). Defaults to None: the test split only.

    Raises:
        HawqUserError: One line naming the missing file or folder, the
            config entry it comes from and the fix.
    """
    datasets = [('test split', 'test_dataloader.dataset',
                 cfg.test_dataloader.dataset)]
    if calibration is not None:
        datasets.append(
            ('calibration set', 'sensitivity.dataset', calibration['dataset'])
            if calibration.get('dataset') else
            ('calibration set', 'train_dataloader.dataset',
             calibration_dataset_cfg(cfg)))
    for what, key, ds_cfg in datasets:
        ann, img = _dataset_files(ds_cfg)
        if ann is not None and not osp.isfile(ann):
            raise HawqUserError(
                f'the {what} annotation file {ann!r} does not exist: '
                f'{MAKE_DATA} or set {key}.data_root/ann_file to where it is')
        if img is not None and not osp.isdir(img):
            raise HawqUserError(
                f'the {what} image folder {img!r} does not exist'
                f'{f" (its annotation file {ann!r} does)" if ann else ""}: '
                f'{MAKE_DATA} or set {key}.data_root/data_prefix.img to '
                'where the images are')


def check_images(dataset, indices: Sequence[int], what: str) -> None:
    """The images ``indices`` of a built dataset exist (a cheap look before
    any work, instead of a DataLoader traceback after it).

    Args:
        dataset: An mmengine dataset (``get_data_info`` with ``img_path``).
        indices (Sequence[int]): The images to look for.
        what (str): The dataset, for the message, e.g. ``'test split'``.

    Raises:
        HawqUserError: One line naming the first missing image (and its
            folder when that is missing too) and the fix.
    """
    for i in indices:
        path = dataset.get_data_info(i).get('img_path')
        if path and is_local_path(path) and not osp.isfile(path):
            folder = osp.dirname(path)
            gone = '' if osp.isdir(folder) else \
                f' (nor does its folder {folder!r})'
            raise HawqUserError(
                f'{what} image {path!r} does not exist{gone}: {MAKE_DATA} '
                'or set data_root/data_prefix.img of the dataset to where '
                'the images are')


def build_detector(cfg, checkpoint: str) -> nn.Module:
    """The config's model with ``checkpoint`` loaded strictly, in eval mode.

    The checkpoint goes through the plugin's loader and
    :func:`~.checkpoint.prepare_state_dict`, as in the Runner: the official
    DETR format is converted, and keys or shapes that do not fit stop with
    one :class:`~mmdet_hawq.errors.HawqUserError` line.
    """
    model = MODELS.build(copy.deepcopy(cfg.model))
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = prepare_state_dict(model, loaded, checkpoint)['state_dict']
    model.load_state_dict(state, strict=True)
    return model.eval()


def resolve_settings(metric: str, settings: Optional[dict],
                     activation: str = 'softmax') -> dict:
    """Defaults merged with the user's settings, checked; the distillation
    defaults follow the class head's ``activation``."""
    s = dict(SENSITIVITY_DEFAULTS)
    if settings is not None and not isinstance(settings, dict):
        raise HawqUserError(
            f'sensitivity {settings!r} is not a dict: give the settings as '
            "a dict, e.g. dict(num_images=100)")
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
    lambda_kl, temperature = DISTILLATION_DEFAULTS[activation]
    if s['lambda_kl'] is None:
        s['lambda_kl'] = lambda_kl
    if s['temperature'] is None:
        s['temperature'] = temperature
    check_setting_values(s, list(settings or {}))
    s['critical_classes'] = check_critical_form(s['critical_classes'],
                                                metric)
    return s


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and np.isfinite(value)


def check_setting_values(s: dict, given: Sequence[str] = ()) -> None:
    """Raise unless the sensitivity settings' values are usable: checked
    before any data, so that a bad value does not surface as a traceback
    (or a one-line error) only after calibration and sampling.

    Args:
        s (dict): The settings, defaults merged in (see
            :data:`SENSITIVITY_DEFAULTS`).
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
        if not _is_number(s[name]) or s[name] < 0 or (
                name == 'temperature' and s[name] == 0):
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


def calibration_dataset_cfg(cfg) -> dict:
    """The train split with the test pipeline (which loads annotations)."""
    ds = copy.deepcopy(cfg.train_dataloader.dataset)
    ds['pipeline'] = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    ds.pop('filter_cfg', None)
    ds['test_mode'] = False
    return ds


def calibration_classes(cfg, settings: Optional[dict]) -> Optional[list]:
    """The class names the calibration dataset's config declares (no data
    is loaded), or None when it does not say."""
    ds_cfg = (settings or {}).get('dataset') or calibration_dataset_cfg(cfg)
    return declared_classes(ds_cfg)


def build_calibration(cfg, settings: dict):
    """Dataset subset with the class distribution of the split, and loader.

    Returns:
        tuple: (DataLoader, list of image ids chosen).
    """
    ds_cfg = copy.deepcopy(settings['dataset'] or
                           calibration_dataset_cfg(cfg))
    # initialised here: mmengine's serialisation of an empty data list
    # fails with numpy's "need at least one array to concatenate"
    ds_cfg['lazy_init'] = True
    dataset = DATASETS.build(ds_cfg)
    try:
        dataset.full_init()
        empty = len(dataset) == 0
    except ValueError:
        # (a serialised dataset clears its data_list: only on failure)
        if getattr(dataset, 'data_list', None) != []:
            raise
        empty = True
    if empty:
        raise HawqUserError(
            'the calibration dataset is empty: point the train split (or '
            'sensitivity.dataset) at annotated images')
    num_classes = len(dataset.metainfo['classes'])
    cat_ids = [[inst['bbox_label'] for inst in dataset.get_data_info(i)
                ['instances']] for i in range(len(dataset))]
    indices = select_calibration_indices(cat_ids, settings['num_images'],
                                         num_classes, settings['seed'])
    check_images(dataset, indices, 'calibration set')
    img_ids = [dataset.get_data_info(i)['img_id'] for i in indices]
    # not BaseDataset.get_subset: mmengine 0.10's copy behind it keeps one
    # deepcopy memo for the whole process (a mutable default argument), so
    # a later copy can get back an object of an earlier one whose id was
    # reused ("'ShapesDataset' object is not callable" inside the pipeline)
    subset = Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=settings['batch_size'],
                        shuffle=False, collate_fn=pseudo_collate)
    return loader, img_ids


#: The settings that choose the calibration images.
CALIBRATION_KEYS = ('num_images', 'batch_size', 'seed', 'dataset')


@dataclass
class Calibration:
    """A run's calibration images, chosen and preprocessed once and shared
    by the sensitivity step and GPTQ.

    Attributes:
        batches (list): Preprocessed batches (the model's data
            preprocessor, on its device).
        img_ids (list): The images' ids (part of the trace cache key).
        classes (list[str]): The calibration dataset's class names.
    """
    batches: List[Any]
    img_ids: List[Any]
    classes: List[str]


def calibration_set(cfg, model: nn.Module,
                    sensitivity: Optional[dict]) -> Calibration:
    """The calibration set of the hook's ``sensitivity`` settings (only
    :data:`CALIBRATION_KEYS` are read, checked when the hook was built),
    preprocessed by ``model``."""
    given = sensitivity or {}
    loader, img_ids = build_calibration(cfg, {
        k: given.get(k, SENSITIVITY_DEFAULTS[k]) for k in CALIBRATION_KEYS})
    return Calibration(preprocess_batches(model, loader), img_ids,
                       list(loader.dataset.dataset.metainfo['classes']))


def _older_key(key: dict) -> Optional[dict]:
    """``key`` as releases before :data:`OLDER_KEYS_WITHOUT` wrote it (None
    when those settings are not at their old values)."""
    settings = dict(key['settings'])
    for name, default in OLDER_KEYS_WITHOUT.items():
        if settings.pop(name, default) != default:
            return None
    return dict(key, settings=settings) if settings != key['settings'] \
        else None


def _cache_key(runner, metric: str, settings: dict, img_ids,
               axis: Optional[int] = None,
               device: torch.device = torch.device('cpu')) -> dict:
    ckpt = runner.cfg.get('load_from')
    keep = {k: v for k, v in settings.items()
            if k not in ('use_cache', 'cache_dir', 'max_samples',
                         'min_samples', 'tol', 'negative_traces')}
    for name, default in OMITTED_AT_DEFAULT.items():
        if keep.get(name, default) == default:
            keep.pop(name, None)
    if axis is not None and metric == 'outquant':
        keep['per_channel'] = True  # the 8-bit point has per-channel scales
    # the draws come from a generator on the weights' device; a CPU and a
    # CUDA run of the same seed draw different streams (CPU keys unchanged)
    draws = DRAWS_VERSION if device.type == 'cpu' else \
        f'{DRAWS_VERSION}-{device.type}'
    return dict(
        metric=metric,
        draws=draws,
        settings=keep,
        model=key_hash(runner.cfg.model.to_dict()),
        checkpoint=file_sha256(ckpt) if ckpt and osp.isfile(ckpt) else None,
        calibration=key_hash(list(img_ids)))


def compute_traces(runner, model: nn.Module, weights: Dict[str, nn.Parameter],
                   metric: str, settings: dict, out_dir: str,
                   calibration: Calibration,
                   axis: Optional[int] = None,
                   influence_bits: Optional[int] = None) -> TraceResult:
    """Per-layer traces of ``metric`` on ``calibration`` (from the cache
    when present).

    The model's weights are float on entry and on exit; for ``outquant`` the
    student is put at the uniform 8-bit weights in between. With
    ``influence_bits``, every weight whose trace is exactly 0 is then
    quantized alone to that many bits and the largest change of the float
    model's outputs is stored in ``result.meta['influence']``.
    """
    family = detector_family(model)
    activation = class_activation(model)
    img_ids, batches = calibration.img_ids, calibration.batches
    critical = None
    if settings['critical_classes'] is not None:
        classes = calibration.classes
        critical = critical_indices(settings['critical_classes'], classes)
        # column order: the same classes in another order are one objective
        settings = dict(settings,
                        critical_classes=[classes[i] for i in critical])
    estimator = settings['estimator']
    key = _cache_key(runner, metric, settings, img_ids, axis,
                     next(iter(weights.values())).device)
    path = cache_path(settings['cache_dir'] or osp.join(out_dir, 'cache'),
                      metric, estimator, key)
    previous = run_on_main(load_cached, path, key) \
        if settings['use_cache'] else None
    read_from, older = path, _older_key(key)
    if previous is None and older is not None and settings['use_cache']:
        read_from = cache_path(osp.dirname(path), metric, estimator, older)
        previous = run_on_main(load_cached, read_from, older)
    if previous is not None:
        runner.logger.info(f'sensitivity: {previous.num_samples} cached '
                           f'samples from {read_from}')
    float_state = {n: p.detach().clone() for n, p in weights.items()}
    teacher = None
    if metric in ('outfloat', 'outquant'):
        teacher = copy.deepcopy(model)
    if metric == 'outquant':
        # W_q8 on exactly the targeted weights (the user's include/exclude)
        quantize_weights_(weights, uniform_plan(weights, 8), axis)

    def on_sample(result: TraceResult) -> None:
        if is_main_process():
            save_cached(path, key, result)
        rel = result.rel_stderr()
        runner.logger.info(
            f'sensitivity {metric}/{estimator}: sample '
            f'{result.num_samples}, median rel. SE '
            f'{float(np.median(rel)):.3f}, max {float(np.max(rel)):.3f}, '
            f'{result.seconds:.1f} s')

    common = dict(tol=settings['tol'], min_samples=settings['min_samples'],
                  max_samples=settings['max_samples'], seed=settings['seed'],
                  result=previous, on_sample=on_sample, objective=metric,
                  shard=process_shard())
    index = list(range(len(batches)))
    try:
        with hessian_mode(model, weights):
            if metric == 'losssen':
                objective = DetrLossObjective(
                    model, batches, family.loss_needs_training_flag,
                    settings['seed'])
            else:
                objective = DistillationObjective(
                    model, teacher, batches, weights,
                    settings['lambda_kl'], settings['temperature'],
                    settings['decoder_layers'], activation,
                    distillation_outputs if settings['proposals'] else
                    decoder_outputs, critical)
            if estimator == 'gauss_newton':
                result = gauss_newton_traces(
                    weights, objective.gauss_newton_sample, index, **common)
            else:
                result = hutchinson_traces(
                    weights, objective.loss, index,
                    per_layer=estimator == 'hutchinson_per_layer', **common)
    finally:
        with torch.no_grad():
            for n, p in weights.items():
                p.copy_(float_state[n])
    result.meta.update(key=key, calibration_img_ids=img_ids)
    if is_main_process():
        save_cached(path, key, result)
    samples = np.asarray(result.samples)
    zero = {n: weights[n] for i, n in enumerate(result.names)
            if not samples[:, i].any()}
    if influence_bits is not None and zero:
        result.meta['influence'] = output_influence(
            model, zero, decoder_outputs, batches[:INFLUENCE_BATCHES],
            lambda w: fake_quantize(w, influence_bits, axis))
    return result


def sensitivity_plan(runner, model: nn.Module,
                     weights: Dict[str, nn.Parameter], metric: str,
                     target_bits: float, bit_range: Sequence[int],
                     axis: Optional[int], settings: Optional[dict],
                     out_dir: str, calibration: Calibration,
                     min_bits: Optional[Dict[str, int]] = None,
                     error_scale: Optional[Dict[str, Dict[int, float]]] = None
                     ) -> Tuple[Dict[str, int], Dict[str, Dict], Dict]:
    """Traces → error terms → ILP plan, plus per-layer report columns and
    the data of the sensitivity report (traces, Pareto curve; see
    :func:`~mmdet_hawq.report.write_sensitivity_report`).

    ``error_scale`` (weight → bits → factor) multiplies the error terms,
    e.g. GPTQ's output-error ratios (:mod:`.rounding`).

    Every rank computes its share of the traces (``out_dir`` holds the
    cache); the plan is solved on rank 0 and given to every rank.
    """
    family, activation = detector_family(model), class_activation(model)
    s = resolve_settings(metric, settings, activation)
    what = (f"loss: {family.loss_note or 'mmdet loss in eval mode'}"
            if metric == 'losssen' else
            f"lambda_kl {s['lambda_kl']}, temperature {s['temperature']}" +
            (f", KL on the critical classes {s['critical_classes']}"
             if s['critical_classes'] else ''))
    runner.logger.info(
        f'sensitivity: {family.name} ({activation} class head), metric '
        f"{metric}, estimator {s['estimator']}, {what}")
    result = compute_traces(runner, model, weights, metric, s, out_dir,
                            calibration, axis, influence_bits=bit_range[0])
    return run_on_main(_allocate, runner, result, weights, metric,
                       target_bits, bit_range, axis, s, min_bits, error_scale)


def _allocate(runner, result: TraceResult, weights: Dict[str, nn.Parameter],
              metric: str, target_bits: float, bit_range: Sequence[int],
              axis: Optional[int], s: dict,
              min_bits: Optional[Dict[str, int]] = None,
              error_scale: Optional[Dict[str, Dict[int, float]]] = None
              ) -> Tuple[Dict[str, int], Dict[str, Dict], Dict]:
    """The ILP on the traces, and the Pareto curve of the same inputs."""
    names = list(weights)
    mean, se = result.mean(), result.stderr()
    unconverged = [n for n, ok in zip(names, result.converged(s['tol']))
                   if not ok]
    if unconverged:
        runner.logger.warning(
            f'sensitivity: {len(unconverged)} of {len(names)} layers did not '
            f"reach rel. SE {s['tol']} in {result.num_samples} samples, "
            f'e.g. {unconverged[:3]}; they are marked in the report')
    used, notes = sensitivities_from_traces(names, mean, se, s['tol'],
                                            s['negative_traces'])
    bits = list(range(bit_range[0], bit_range[1] + 1))
    fixed = blind_spots(result, bits, used, notes)
    if fixed:
        runner.logger.warning(
            f'sensitivity: {len(fixed)} weight(s) have no gradient path but '
            f'change the outputs, kept at {bits[-1]} bits: {sorted(fixed)}')
    errors = error_terms(weights, bits, axis,
                         reference_bits=8 if metric == 'outquant' else None)
    if error_scale is not None:
        errors = {n: {b: e * error_scale[n][b] for b, e in by_bits.items()}
                  for n, by_bits in errors.items()}
    used, errors = _plan_inputs(used, errors)
    numels = {n: p.numel() for n, p in weights.items()}
    alloc = solve_allocation(used, errors, numels, target_bits, bits,
                             fixed=fixed, min_bits=min_bits)
    extra = {}
    for i, n in enumerate(names):
        extra[n] = dict(
            trace_mean=float(mean[i]), trace_se=float(se[i]),
            trace_used=used[n], trace_note=notes[n],
            error_by_bits={str(b): errors[n][b] for b in bits})
        if error_scale is not None:
            extra[n]['gptq_error_ratio'] = {
                str(b): error_scale[n][b] for b in bits}
    # the Pareto curve of the same traces: predicted perturbation vs bits
    targets = np.round(np.arange(bits[0], bits[-1] + 1e-9, 0.25), 2)
    report = dict(
        metric=metric, estimator=result.estimator, names=names,
        traces=dict(result.to_dict(), tol=s['tol'], mean=mean.tolist(),
                    se=se.tolist()),
        pareto=pareto_sweep(used, errors, numels, targets, bits, fixed,
                            min_bits))
    runner.logger.info(
        f'allocation: {alloc.avg_bits:.3f} bits on average (target '
        f'{target_bits}), predicted perturbation {alloc.objective:.4g}')
    return alloc.plan, extra, report


def _plan_inputs(used: Dict[str, float],
                 errors: Dict[str, Dict[int, float]]
                 ) -> Tuple[Dict[str, float], Dict[str, Dict[int, float]]]:
    """Sensitivities and error terms as the ILP sees them: rounded to
    :data:`~..allocation.ilp.PLAN_DIGITS` significant digits, far below the
    traces' standard errors, so float noise (another intra-op thread count)
    cannot change the plan."""
    return ({n: round_significant(v) for n, v in used.items()},
            {n: {b: round_significant(e) for b, e in by_bits.items()}
             for n, by_bits in errors.items()})


def blind_spots(result: TraceResult, bits: Sequence[int],
                used: Dict[str, float], notes: Dict[str, str]
                ) -> Dict[str, int]:
    """Zero-trace weights that change the outputs → fixed at the top bits.

    Every weight tested by the influence check gets a note: 'no influence'
    (its zero trace is right) or 'blind spot' (no gradient path, yet the
    outputs move); its sensitivity is set to 0 either way, and blind spots
    are returned for the ILP to fix at ``bits[-1]``.
    """
    no_grad = set(result.meta.get('no_gradient', []))
    fixed = {}
    for name, diff in result.meta.get('influence', {}).items():
        how = 'no gradient path' if name in no_grad else 'zero gradient'
        if diff > 0:
            fixed[name] = bits[-1]
            note = (f'blind spot: {how}, but {bits[0]}-bit weights change '
                    f'the outputs by up to {diff:.3g}: kept at {bits[-1]} '
                    'bits')
        else:
            note = (f'no influence: {how}, and {bits[0]}-bit weights leave '
                    'the outputs unchanged')
        used[name] = 0.0
        notes[name] = '; '.join(x for x in (notes[name], note) if x)
    return fixed

"""The calibration set and the data checks of a run, from its config.

:func:`calibration_set` chooses ``num_images`` images of the calibration
dataset (by default the train split with the test pipeline) with the class
distribution of the split (:func:`~mmdet_hawq.sensitivity.
select_calibration_indices`) and preprocesses them once, for the sensitivity
step and GPTQ. :func:`check_data_files` and :func:`check_images` look for
the files a run reads before any work, so that a missing one is one line,
not a DataLoader traceback after minutes of work.
"""
import copy
import os.path as osp
from typing import Any, List, Optional, Sequence, Tuple

import torch.nn as nn

from mmdet.registry import DATASETS
from ..api import Calibration, CalibrationSettings
from ..errors import HawqUserError
from ..sensitivity import calibration_loader
from .checkpoint import is_local_path

#: The first fix of a missing data file, in the data checks' messages.
MAKE_DATA = 'make the data (`make data` for the shapes benchmark)'


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


def check_data_files(cfg, calibration: Optional[CalibrationSettings] = None
                     ) -> None:
    """The annotation file and image folder of the test split, and of the
    calibration set when the hook reads one, and the test evaluator's
    annotation file exist; no annotation is read.

    Args:
        cfg (mmengine.Config): The run's config.
        calibration (CalibrationSettings, optional): The run's calibration
            settings when it reads calibration images (the sensitivity
            metrics, GPTQ rounding, activations). Defaults to None: the
            test split only.

    Raises:
        HawqUserError: One line naming the missing file or folder, the
            config entry it comes from and the fix.
    """
    datasets = [('test split', 'test_dataloader.dataset',
                 cfg.test_dataloader.dataset)]
    if calibration is not None:
        datasets.append(
            ('calibration set', 'calibration.dataset', calibration.dataset)
            if calibration.dataset else
            ('calibration set', 'train_dataloader.dataset',
             calibration_dataset_cfg(cfg)))
    evaluators = cfg.get('test_evaluator') or {}
    listed = isinstance(evaluators, (list, tuple))
    for i, metric in enumerate(evaluators if listed else [evaluators]):
        ann = metric.get('ann_file')
        key = f'test_evaluator.{i}' if listed else 'test_evaluator'
        if isinstance(ann, str) and is_local_path(ann) and \
                not osp.isfile(ann):
            raise HawqUserError(
                f'the {key} annotation file {ann!r} does not exist: '
                f'{MAKE_DATA} or set {key}.ann_file to where it is')
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


def calibration_dataset_cfg(cfg) -> dict:
    """The train split with the test pipeline (which loads annotations)."""
    ds = copy.deepcopy(cfg.train_dataloader.dataset)
    ds['pipeline'] = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    ds.pop('filter_cfg', None)
    ds['test_mode'] = False
    return ds


def calibration_classes(cfg, settings: Optional[CalibrationSettings]
                        ) -> Optional[list]:
    """The class names the calibration dataset's config declares (no data
    is loaded), or None when it does not say."""
    ds_cfg = (settings and settings.dataset) or calibration_dataset_cfg(cfg)
    return declared_classes(ds_cfg)


def build_calibration(cfg, settings: CalibrationSettings):
    """Dataset subset with the class distribution of the split, and loader.

    Returns:
        tuple: (DataLoader, list of image ids chosen).
    """
    ds_cfg = copy.deepcopy(settings.dataset or
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
            'calibration.dataset) at annotated images')
    loader, indices = calibration_loader(dataset, settings.num_images,
                                         settings.batch_size, settings.seed)
    check_images(dataset, indices, 'calibration set')
    return loader, [dataset.get_data_info(i)['img_id'] for i in indices]


def calibration_set(cfg: Any, model: nn.Module,
                    settings: CalibrationSettings) -> Calibration:
    """The calibration set of the run, preprocessed by ``model`` (on its
    device).

    Args:
        cfg (mmengine.Config): The run's config (its train split and test
            pipeline are the default calibration dataset).
        model (nn.Module): The detector (its data preprocessor).
        settings (CalibrationSettings): Which images
            (:attr:`~mmdet_hawq.api.QuantSettings.calibration`).
    """
    loader, img_ids = build_calibration(cfg, settings)
    return Calibration.from_loader(model, loader, img_ids)


def declared_classes(dataset_cfg) -> Optional[List[str]]:
    """The classes a dataset config declares, without loading any data.

    Args:
        dataset_cfg (dict): A dataset config (``type``, optional
            ``metainfo``).

    Returns:
        list[str] or None: ``metainfo.classes`` of the config, else the
        dataset class's ``METAINFO['classes']``; None when neither says
        (e.g. a dataset wrapper), and the built dataset is checked instead.
    """
    meta = dataset_cfg.get('metainfo') or {}
    if meta.get('classes'):
        return list(meta['classes'])
    kind = dataset_cfg.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    classes = getattr(cls, 'METAINFO', {}).get('classes')
    return list(classes) if classes else None


def calibration_images(cfg: Any, num_images: int, seed: int,
                       shape: Sequence[int]) -> List[Any]:
    """The project's calibration images, as the ONNX graph takes them:
    float32 (1, 3, H, W), 0-255."""
    import numpy as np
    from mmdet.utils import register_all_modules

    register_all_modules()
    settings = CalibrationSettings(num_images=num_images, seed=seed,
                                   batch_size=1)
    check_data_files(cfg, settings)
    loader, _ = build_calibration(cfg, settings)
    images = []
    for batch in loader:
        for image in batch['inputs']:
            if tuple(image.shape[1:]) != tuple(shape):
                raise HawqUserError(
                    f'a calibration image is {image.shape[1]}x'
                    f'{image.shape[2]} px, the model takes {shape[0]}x'
                    f'{shape[1]}: pass --shape H W of the test pipeline\'s '
                    'output')
            images.append(image.cpu().numpy().astype(np.float32)[None])
    return images

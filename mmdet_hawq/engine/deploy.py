"""What the deployment tools share: a detector and its packed weights from a
config and a checkpoint, the exported input size, the test images.

The tools (``export_onnx.py``, ``evaluate_onnx.py``, ``benchmark_deploy.py``)
go through these, so a checkpoint is checked as strictly as for
``tools/ptq.py`` (:func:`~mmdet_hawq.engine.detector.build_detector`).
"""
import copy
import os.path as osp
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from ..errors import HawqUserError
from ..quant.packing import is_packed
from .checkpoint import is_local_path, load_checkpoint_file

__all__ = [
    'build_packed_detector', 'default_input_shape', 'load_for_export',
    'test_images', 'test_loader'
]


def _check_file(checkpoint: str) -> None:
    if not is_local_path(checkpoint) or not osp.isfile(checkpoint):
        raise HawqUserError(
            f'checkpoint file {checkpoint!r} does not exist: pass an existing '
            '.pth file (a float checkpoint or a packed.pth)')


def load_for_export(cfg: Any, checkpoint: str
                    ) -> Tuple[nn.Module, Optional[Mapping[str, Mapping]]]:
    """The detector with the checkpoint's weights, and its packed weights.

    Args:
        cfg (mmengine.Config): The detector's config.
        checkpoint (str): A float checkpoint or a packed low-bit one.

    Returns:
        tuple: The detector in eval mode (a packed file's weights
        dequantized: the fake-quantized model), and the packed file's
        ``packed`` entries (None for a float checkpoint).

    Raises:
        HawqUserError: The file is missing or does not fit the model.
    """
    from mmdet.utils import register_all_modules

    from .detector import build_detector
    _check_file(checkpoint)
    register_all_modules()
    model = build_detector(cfg, checkpoint)
    raw = load_checkpoint_file(checkpoint)
    return model, (raw['packed'] if is_packed(raw) else None)


def build_packed_detector(cfg: Any, checkpoint: str) -> nn.Module:
    """The detector with a packed file's weights kept packed.

    Args:
        cfg (mmengine.Config): The detector's config.
        checkpoint (str): A packed low-bit checkpoint.

    Returns:
        nn.Module: The detector in eval mode; each quantized weight is a
        :class:`~mmdet_hawq.deploy.packed_weights.PackedWeight`.

    Raises:
        HawqUserError: The file is missing, not packed or does not fit.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from ..deploy.packed_weights import load_packed
    _check_file(checkpoint)
    register_all_modules()
    model = MODELS.build(copy.deepcopy(cfg.model))
    return load_packed(model, load_checkpoint_file(checkpoint),
                       keep_packed=True, source=checkpoint)


def default_input_shape(cfg: Any,
                        given: Optional[Sequence[int]] = None
                        ) -> Tuple[int, int]:
    """``(H, W)`` of the exported input: ``given``, or the test pipeline's
    fixed output size.

    Args:
        cfg (mmengine.Config): The detector's config.
        given (Sequence[int], optional): ``--shape H W``. Defaults to None.

    Returns:
        tuple[int, int]: ``(H, W)``.

    Raises:
        HawqUserError: ``given`` is not two positive integers, or the
            pipeline's output size is not fixed and none was given.
    """
    if given is not None:
        if len(given) != 2 or min(given) < 1:
            raise HawqUserError(
                f'--shape {list(given)} is not a size: pass two positive '
                'integers H W')
        return int(given[0]), int(given[1])
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get(
        'pipeline', [])
    for step in pipeline:
        if step.get('type') == 'Resize' and 'scale' in step:
            w, h = step['scale'] if not isinstance(step['scale'], int) \
                else (step['scale'], step['scale'])
            if not step.get('keep_ratio', False) or w == h:
                # keep_ratio into a square: square images come out this size
                return int(h), int(w)
    raise HawqUserError(
        'the test pipeline does not resize to one fixed size: pass the '
        'exported image size with --shape H W')


def test_loader(cfg: Any) -> Any:
    """The config's test dataloader.

    Args:
        cfg (mmengine.Config): The detector's config.

    Returns:
        torch.utils.data.DataLoader: Built by mmengine's Runner.

    Raises:
        HawqUserError: The annotation file is missing.
    """
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    dataset = loader_cfg.get('dataset', {})
    ann = osp.join(dataset.get('data_root', ''), dataset.get('ann_file', ''))
    if dataset.get('ann_file') and not osp.isfile(ann):
        raise HawqUserError(
            f'the test annotations {ann!r} do not exist: make the data '
            '(`make data` for the shapes benchmark) or point the config\'s '
            'test_dataloader at it')
    return Runner.build_dataloader(loader_cfg)


def test_images(loader: Any,
                limit: Optional[int] = None) -> Iterator[Tuple[Any, Any]]:
    """The images of a test dataloader as the pipeline loads them, one at a
    time.

    Args:
        loader (DataLoader): From :func:`test_loader`.
        limit (int, optional): Stop after this many. Defaults to None (all).

    Yields:
        tuple: uint8 image (3, H, W) and its DetDataSample.
    """
    count = 0
    for batch in loader:
        for image, sample in zip(batch['inputs'], batch['data_samples']):
            if limit is not None and count >= limit:
                return
            yield image, sample
            count += 1

"""The detector of a config: its type checked before anything is built, and
built with a checkpoint loaded strictly (the tools' fail-fast checks)."""
import copy
from typing import Any

import torch.nn as nn
from mmengine.runner import CheckpointLoader

from mmdet.registry import MODELS
from ..models import detector_family
from .checkpoint import prepare_state_dict


def check_detector_type(model_cfg: dict) -> None:
    """Stop a config whose detector is not a supported DETR-family type,
    before anything is built.

    Args:
        model_cfg (dict): The config's ``model`` (its ``type``: a name in
            mmdet's registry, or the class).

    Raises:
        HawqUserError: Neither the type nor a base class of it is supported
            (:func:`~mmdet_hawq.models.detector_family`). An unregistered
            type is left to mmengine's own error.
    """
    kind = model_cfg.get('type')
    cls = kind if isinstance(kind, type) else MODELS.get(kind)
    if cls is not None:
        detector_family(cls)


def build_detector(cfg: Any, checkpoint: str) -> nn.Module:
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

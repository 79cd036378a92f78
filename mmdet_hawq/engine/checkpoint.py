"""Checkpoint loading that works with torch >= 2.6, takes the official DETR
checkpoint, and fails clearly.

mmengine 0.10.7 calls ``torch.load(path)`` without ``weights_only``; since
torch 2.6 that defaults to ``True`` and rejects the numpy and mmengine
objects that mmengine/mmdet checkpoints carry in their ``meta``. This module
re-registers mmengine's loader for local paths: it tries the safe
``weights_only=True`` first and falls back to full unpickling (the behaviour
mmengine was written for) only for files that need it. A missing or
unreadable file raises :class:`~mmdet_hawq.errors.HawqUserError` naming the
file and the fix.

The loader (and mmengine's URL loader, wrapped) also converts an official
facebookresearch/detr checkpoint (e.g. ``detr-r50-e632da11.pth``) to mmdet's
names in memory, and says so in the log, so every load of the plugin's
configs takes the file as it is
(:mod:`mmdet_hawq.models.adapters.official_detr`). :func:`prepare_state_dict`
(which ``DistillSensitivityHook.after_load_checkpoint`` calls) makes a load
strict: the state dict must have exactly the model's keys and shapes, and
finite values.
"""
import os.path as osp
import pickle
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from mmengine.runner import checkpoint as mm_checkpoint

from ..errors import HawqUserError, short_list
from ..models.adapters.official_detr import (class_head_note,
                                             convert_official_detr,
                                             official_detr_state)
from ..quant.packing import is_packed, unpack_checkpoint
from ..quant.quantizer import count_nonfinite

#: The fix named by every key-mismatch error.
_FIX = ('pass a checkpoint of this config\'s model: one trained with it by '
        'mmdet, the official facebookresearch DETR file for the detr_r50 '
        'configs, or a packed file written by DistillSensitivityHook')


def is_local_path(path: str) -> bool:
    """Whether mmengine reads a checkpoint ``path`` from the local disk.

    URLs and other backends (``http(s)://``, ``s3://``, ``torchvision://``,
    ``open-mmlab://``, ...) are checked by their loaders when loaded.

    Args:
        path (str): A checkpoint path or URL.

    Returns:
        bool: False for anything with a ``scheme://`` prefix.
    """
    return '://' not in str(path)


def check_checkpoint(path: str, option: Optional[str] = None,
                     urls: bool = True) -> str:
    """Stop with one line when a checkpoint file is missing.

    Args:
        path (str): A checkpoint path (or URL: checked by its loader when
            loaded).
        option (str, optional): The option that takes it (e.g.
            ``'--checkpoint'``), named in the fix. Defaults to None.
        urls (bool): Whether a URL is taken. Defaults to True.

    Returns:
        str: ``path``.

    Raises:
        HawqUserError: A local file that does not exist, or a URL where
            only files are read.
    """
    if not is_local_path(path) and urls:
        return path
    if not is_local_path(path) or not osp.isfile(osp.expanduser(path)):
        fix = 'an existing .pth file' + (' or a URL' if urls else '')
        raise HawqUserError(
            f'checkpoint file {path!r} does not exist: pass {fix}'
            + (f' with {option}' if option else ''))
    return path


def load_checkpoint_file(filename: str,
                         map_location: Optional[Union[str, Callable]] = 'cpu'
                         ) -> Any:
    """Load a local checkpoint file.

    Args:
        filename (str): Path of the file.
        map_location (str | Callable, optional): Passed to ``torch.load``.
            Defaults to ``'cpu'``.

    Returns:
        Any: The unpickled object, usually a dict with ``state_dict``.

    Raises:
        HawqUserError: The file is missing or is not a torch checkpoint.
    """
    filename = check_checkpoint(osp.expanduser(filename), urls=False)
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError:
        pass  # needs full unpickling (mmengine meta objects); retried below
    except Exception as err:  # noqa: BLE001 - reported as one clear line
        raise _unreadable(filename, err) from None
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise _unreadable(filename, err) from None


def _unreadable(filename: str, err: Exception) -> HawqUserError:
    return HawqUserError(
        f'checkpoint file {filename!r} could not be read ({err}): it is '
        'corrupted or not a torch checkpoint; re-download or re-export it')


@CheckpointLoader.register_scheme(prefixes='', force=True)
def _load_from_local(filename: str,
                     map_location: Optional[Union[str, Callable]] = None
                     ) -> Any:
    """mmengine's loader for local paths, replaced by the plugin.

    Packed low-bit checkpoints of this plugin are unpacked on the way, so
    ``load_from`` and ``--checkpoint`` take them like any other file.
    """
    checkpoint = load_checkpoint_file(filename, map_location)
    if is_packed(checkpoint):
        checkpoint = unpack_checkpoint(checkpoint)
    return convert_if_official(checkpoint, filename)


def _name(source: Optional[str]) -> str:
    return f'checkpoint {source!r}' if source else 'the checkpoint'


@CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                  force=True)
def _load_from_http(filename: str,
                    map_location: Optional[Union[str, Callable]] = None
                    ) -> Any:
    """mmengine's loader for URLs, plus the official format's conversion (so
    the official download URL works like the downloaded file); a failed
    download is one :class:`~mmdet_hawq.errors.HawqUserError` line."""
    try:
        checkpoint = mm_checkpoint.load_from_http(filename, map_location)
    except Exception as err:  # noqa: BLE001 - reported as one clear line
        raise HawqUserError(
            f'checkpoint URL {filename!r} could not be loaded '
            f'({type(err).__name__}: {err}): check the URL and the network, '
            'or download the file and pass its path') from None
    return convert_if_official(checkpoint, filename)


def convert_if_official(checkpoint: Any, source: Optional[str] = None) -> Any:
    """An official facebookresearch/detr checkpoint as an mmdet one.

    Args:
        checkpoint (Any): A loaded checkpoint.
        source (str, optional): Its file, for the log. Defaults to None.

    Returns:
        Any: ``dict(state_dict=..., meta=...)`` in mmdet's names when
        ``checkpoint`` is official (logged), else ``checkpoint`` unchanged.
    """
    official = official_detr_state(checkpoint)
    if official is None:
        return checkpoint
    state = convert_official_detr(official)
    head = class_head_note(official, state)
    print_log(
        f'{_name(source)}: official facebookresearch/detr checkpoint, '
        f'converted to mmdet DETR names in memory ({len(official)} tensors'
        f'{head}); the file is unchanged', logger='current')
    return dict(state_dict=state,
                meta=dict(converted_from='facebookresearch/detr',
                          source=osp.basename(source or '')))


def _state_of(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict as mmengine reads it (``state_dict`` or the checkpoint
    itself), as a new dict without a ``module.`` prefix (a checkpoint saved
    from a DDP wrapper); torch's ``_metadata`` is kept."""
    state = checkpoint.get('state_dict', checkpoint)
    strip = state and all(
        isinstance(k, str) and k.startswith('module.') for k in state)

    def name(key: str) -> str:
        return re.sub(r'^module\.?', '', key) if strip else key

    out = OrderedDict((name(k), v) for k, v in state.items())
    if hasattr(state, '_metadata'):
        out._metadata = OrderedDict(
            (name(k), v) for k, v in state._metadata.items())
    return out


def check_state_dict(model: nn.Module, state: Dict[str, Any],
                     source: Optional[str] = None) -> None:
    """Require exactly the model's keys, with the model's shapes.

    Args:
        model (nn.Module): The model to load into.
        state (dict): The state dict to load.
        source (str, optional): The checkpoint's file, for the error.
            Defaults to None.

    Raises:
        HawqUserError: One line listing the missing, unexpected and
            mismatched keys (cut after a few) and the fix.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing and len(unexpected) == len(state):
        raise HawqUserError(
            f'{_name(source)} matches neither the model (none of its '
            f'{len(state)} keys [{short_list(unexpected, 3)}] is one of the '
            f'model\'s) nor the official facebookresearch DETR format: {_FIX}')
    shapes = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in state.items() if k in own
              and hasattr(v, 'shape') and v.shape != own[k].shape]
    problems = [f'{len(items)} {what} ({short_list(items)})'
                for what, items in (('missing key(s)', missing),
                                    ('unexpected key(s)', unexpected),
                                    ('shape mismatch(es)', shapes)) if items]
    if problems:
        raise HawqUserError(
            f'{_name(source)} does not fit the model: {"; ".join(problems)}: '
            f'{_FIX}')


def nonfinite_tensors(tensors: Mapping[str, Any]
                      ) -> Dict[str, Tuple[int, int]]:
    """The floating-point tensors that hold a NaN or Inf.

    Args:
        tensors (Mapping[str, Any]): Name → tensor (other values skipped).

    Returns:
        dict[str, tuple[int, int]]: Name → (non-finite elements, elements),
        in the order of ``tensors``.
    """
    bad = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            count = count_nonfinite(value)
            if count:
                bad[name] = (count, value.numel())
    return bad


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise one line naming the tensors of ``what`` with NaN/Inf values.

    Args:
        tensors (Mapping[str, Any]): Name → tensor.
        what (str): What they are, for the message (e.g. ``"checkpoint
            'x.pth'"``).

    Raises:
        HawqUserError: A tensor has a NaN or Inf element.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        items = [f'{n} ({c} of {t} elements)' for n, (c, t) in bad.items()]
        raise HawqUserError(
            f'{what} has NaN/Inf values in {len(bad)} tensor(s): '
            f'{short_list(items, 3)}: check the checkpoint (a diverged '
            'training run or a damaged file) and pass one with finite '
            'weights; quantizing it would give a meaningless model')


def prepare_state_dict(model: nn.Module, checkpoint: Dict[str, Any],
                       source: Optional[str] = None) -> Dict[str, Any]:
    """Make a loaded checkpoint load strictly into ``model``.

    Converts an official facebookresearch/detr checkpoint (logged), strips a
    ``module.`` prefix and checks keys and shapes. ``checkpoint`` is updated
    in place (what mmengine's ``after_load_checkpoint`` needs): the result is
    under ``checkpoint['state_dict']``.

    Args:
        model (nn.Module): The model it will be loaded into (unwrapped).
        checkpoint (dict): The loaded checkpoint; the user's file is not
            touched.
        source (str, optional): The checkpoint's file, for messages.
            Defaults to None.

    Returns:
        dict: ``checkpoint``.

    Raises:
        HawqUserError: The keys or shapes do not fit the model, or a tensor
            holds a NaN or Inf.
    """
    state = _state_of(convert_if_official(checkpoint, source))
    check_state_dict(model, state, source)
    check_finite(state, _name(source))
    checkpoint['state_dict'] = state
    return checkpoint

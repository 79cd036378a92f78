"""Checkpoint loading that works with torch >= 2.6 and fails clearly.

mmengine 0.10.7 calls ``torch.load(path)`` without ``weights_only``; since
torch 2.6 that defaults to ``True`` and rejects the numpy and mmengine
objects that mmengine/mmdet checkpoints carry in their ``meta``. This module
re-registers mmengine's loader for local paths: it tries the safe
``weights_only=True`` first and falls back to full unpickling (the behaviour
mmengine was written for) only for files that need it. A missing or
unreadable file raises :class:`~mmdet_hawq.errors.HawqUserError` naming the
file and the fix.
"""
import os.path as osp
import pickle
from typing import Any, Callable, Optional, Union

import torch
from mmengine.runner import CheckpointLoader

from ..errors import HawqUserError
from ..quant.packing import is_packed, unpack_checkpoint


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
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise HawqUserError(
            f'checkpoint file {filename!r} does not exist: pass the path of '
            'an existing .pth file (e.g. checkpoints/detr_tiny_shapes.pth)')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError:
        pass  # needs full unpickling (mmengine meta objects); retried below
    except Exception as err:  # noqa: BLE001 - reported as one clear line
        raise HawqUserError(
            f'checkpoint file {filename!r} could not be read ({err}): it is '
            'corrupted or not a torch checkpoint; re-download or re-export '
            'it') from None
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise HawqUserError(
            f'checkpoint file {filename!r} could not be read ({err}): it is '
            'corrupted or not a torch checkpoint; re-download or re-export '
            'it') from None


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
    return checkpoint

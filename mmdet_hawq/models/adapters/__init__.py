"""One adapter per supported detector family: the only code that knows a
family's head, decoder outputs, proposals, class activation, float weights,
bit floors, deformable attention and ONNX prediction.

A new family is one module here with a :class:`~.base.DetrAdapter` subclass,
listed in :data:`ADAPTERS`; the test suite builds each adapter's
``test_configs``.
"""
from typing import Optional, Tuple, Union

import torch.nn as nn

from ...errors import HawqUserError
from .base import DetrAdapter
from .ddq_detr import DDQDETRAdapter
from .deformable_detr import DeformableDETRAdapter, DINOAdapter
from .detr import ConditionalDETRAdapter, DABDETRAdapter, DETRAdapter

#: The supported families. A detector gets the adapter of the nearest class
#: in its method resolution order (DDQDETR subclasses DINO, which subclasses
#: DeformableDETR).
ADAPTERS: Tuple[DetrAdapter, ...] = (
    DETRAdapter(), ConditionalDETRAdapter(), DABDETRAdapter(),
    DeformableDETRAdapter(), DINOAdapter(), DDQDETRAdapter())


def find_adapter(model: Union[nn.Module, type]) -> Optional[DetrAdapter]:
    """The adapter of ``model``'s family (its class or the nearest base
    class that has one), or None for any other module.

    Args:
        model (nn.Module | type): A module, or its class.
    """
    cls = model if isinstance(model, type) else type(model)
    by_class = {a.detector: a for a in ADAPTERS}
    for base in cls.__mro__:
        if base.__name__ in by_class:
            return by_class[base.__name__]
    return None


def adapter_of(model: Union[nn.Module, type]) -> DetrAdapter:
    """:func:`find_adapter`, for a module that must be a supported detector.

    Args:
        model (nn.Module | type): A detector, or its class (to check a
            config's ``model.type`` before anything is built).

    Raises:
        HawqUserError: The detector is not a supported DETR-family type.
    """
    adapter = find_adapter(model)
    if adapter is not None:
        return adapter
    cls = model if isinstance(model, type) else type(model)
    raise HawqUserError(
        f'detector type {cls.__name__} is not supported: the supported '
        'DETR-family detectors are '
        f'{", ".join(a.detector for a in ADAPTERS)} (and their subclasses)')


__all__ = [
    'ADAPTERS', 'ConditionalDETRAdapter', 'DABDETRAdapter',
    'DDQDETRAdapter', 'DETRAdapter', 'DINOAdapter', 'DeformableDETRAdapter',
    'DetrAdapter', 'adapter_of', 'find_adapter'
]

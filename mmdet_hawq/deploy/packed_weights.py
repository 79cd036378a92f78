"""Quantized weights kept as packed integer codes on the module.

:func:`load_packed` with ``keep_packed=True`` loads a packed checkpoint
(:mod:`mmdet_hawq.quant.packing`) into a detector without expanding its
quantized weights to fp32: each one becomes a
:mod:`torch.nn.utils.parametrize` parametrization whose two buffers are the
codes packed at their bit-width (the file's ``ceil(numel * bits / 8)``
bytes, rearranged into byte planes with at most ``bits - 1`` bytes of
padding) and the fp32 scale. Reading ``module.weight`` unpacks and
dequantizes them, so the fp32 copy exists only while the layer runs;
mmdet's model code is not touched. The dequantized weights are computed by
:func:`~mmdet_hawq.quant.quantizer.dequantize`, the function that made the
fake-quantized model, so detections are bit-identical to it.
"""
from collections.abc import Mapping
from typing import Any, Collection, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import HawqUserError, short_list
from ..quant.packing import (is_packed, pack_planes, pad_packed_codes,
                             unpack_checkpoint, unpack_codes, unpack_planes)
from ..quant.quantizer import dequantize, qmax, quantize_weight

__all__ = [
    'PackedWeight', 'attach_packed_weights', 'load_packed',
    'module_weight_bytes', 'packed_entry_codes', 'split_weight_name'
]


def split_weight_name(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module that owns ``name`` and the attribute name.

    Args:
        model (nn.Module): The model.
        name (str): A state-dict name, e.g. ``'decoder.layers.0.ffn.w'``.

    Returns:
        tuple[nn.Module, str]: Owner module and attribute.

    Raises:
        HawqUserError: No module of ``model`` has that attribute.
    """
    prefix, _, attr = name.rpartition('.')
    try:
        owner = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, attr, None),
                                       torch.Tensor):
        raise HawqUserError(
            f'the packed weight {name!r} is not a tensor of '
            f'{type(model).__name__}: pass a packed checkpoint written for '
            'this config\'s model')
    return owner, attr


class PackedWeight(nn.Module):
    """Parametrization: packed codes and scale → the dequantized weight.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`
    its two originals are buffers: ``original0``, the packed codes as byte
    planes (uint8 (bits, ceil(numel / 8)),
    :func:`~mmdet_hawq.quant.packing.pad_packed_codes`: the file's bytes
    plus at most ``bits - 1`` of padding), and ``original1``,
    the scale (0-d, or broadcastable to the weight with size 1 off
    ``axis``). Register it on a buffer (as :func:`attach_packed_weights`
    does) or on a parameter without gradient: parametrize would make the
    uint8 codes a parameter that requires gradients, which torch refuses.

    Args:
        bits (int): Bit-width, 2 to 8.
        shape (tuple[int, ...]): Shape of the weight.
        axis (int, optional): Channel axis of a per-channel scale; None for
            per tensor. Defaults to None.
        packed (tuple[Tensor, Tensor], optional): Codes (as in the packed
            file) and scale that the first :meth:`right_inverse` returns
            instead of quantizing again (re-quantizing a fake-quantized
            weight can move its scale by one ulp). Defaults to None.
        dtype (torch.dtype): dtype of the dequantized weight. Defaults to
            ``torch.float32``.
        requires_grad (bool): Flag the dequantized weight as requiring
            gradients, like the parameter it replaces. ATen chooses some
            kernels by this flag (``matmul`` of a 3-D input folds it into
            one ``mm`` or not), and the two kernels round differently, so
            the flag keeps the fake-quantized model's kernels and its
            outputs bit for bit. Defaults to False.
    """

    def __init__(self,
                 bits: int,
                 shape: Tuple[int, ...],
                 axis: Optional[int] = None,
                 packed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 dtype: torch.dtype = torch.float32,
                 requires_grad: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.shape = tuple(shape)
        self.numel = 1
        for size in self.shape:
            self.numel *= size
        self.axis = axis
        self.dtype = dtype
        self.requires_grad = requires_grad
        self._pending = packed

    def forward(self, data: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """The weight ``codes * scale``.

        Args:
            data (Tensor): Packed codes, uint8 (bits, ceil(numel / 8)).
            scale (Tensor): Scale.

        Returns:
            Tensor: The dequantized weight, shape ``self.shape``.
        """
        codes = unpack_planes(data, self.bits, self.numel)
        weight = dequantize(codes.reshape(self.shape), scale, self.dtype)
        if self.requires_grad:  # a leaf: made from buffers
            weight.requires_grad_(True)
        return weight

    def right_inverse(
            self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed codes and scale of ``weight`` (what assigning stores).

        Args:
            weight (Tensor): A float weight of shape ``self.shape``.

        Returns:
            tuple[Tensor, Tensor]: Byte planes of the packed codes and the
            scale.
        """
        if self._pending is not None:
            data, scale = self._pending
            self._pending = None
            return pad_packed_codes(data, self.bits, self.numel), scale
        qw = quantize_weight(weight, self.bits, self.axis)
        flat = (qw.codes.reshape(-1).to(torch.int64) + qmax(self.bits))
        data = pack_planes(flat, self.bits)
        return data, qw.scale

    def extra_repr(self) -> str:
        return (f'bits={self.bits}, shape={self.shape}, axis={self.axis}')


def packed_entry_codes(entry: Mapping) -> torch.Tensor:
    """int8 codes of one entry of a packed checkpoint, in the weight's shape.

    Args:
        entry (Mapping): ``{'data', 'bits', 'shape', 'scale', 'axis'}`` as
            :func:`~mmdet_hawq.quant.packing.pack_state_dict` writes it.

    Returns:
        Tensor: int8 codes, shape ``entry['shape']``.
    """
    shape = tuple(entry['shape'])
    numel = 1
    for size in shape:
        numel *= size
    return unpack_codes(entry['data'], entry['bits'], numel).reshape(shape)


def attach_packed_weights(model: nn.Module,
                          packed: Mapping[str, Mapping]
                          ) -> Dict[str, PackedWeight]:
    """Replace each named weight by its packed codes and scale.

    The weight's parameter is removed from its module (its memory is freed
    once nothing else holds it) and a :class:`PackedWeight` parametrization
    is registered in its place. While the owning module runs, its weights
    are dequantized once and cached (``parametrize.cached``, entered and
    left by forward hooks): ``nn.MultiheadAttention`` reads
    ``in_proj_weight`` several times a call.

    Args:
        model (nn.Module): The detector, its other weights loaded.
        packed (Mapping[str, Mapping]): The ``packed`` part of a packed
            checkpoint: weight name → ``{'data', 'bits', 'shape', 'scale',
            'axis'}``.

    Returns:
        dict[str, PackedWeight]: The parametrization of each weight.

    Raises:
        HawqUserError: A name is not a tensor of the model, or its shape
            differs from the model's.
    """
    attached = {}
    for name, entry in packed.items():
        owner, attr = split_weight_name(model, name)
        current = getattr(owner, attr)
        shape = tuple(entry['shape'])
        if tuple(current.shape) != shape:
            raise HawqUserError(
                f'the packed weight {name!r} has shape {shape}, the model\'s '
                f'{tuple(current.shape)}: pass a packed checkpoint written '
                'for this config\'s model')
        param = PackedWeight(entry['bits'], shape, entry['axis'],
                             packed=(entry['data'], entry['scale']),
                             dtype=current.dtype,
                             requires_grad=current.requires_grad)
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        # a buffer placeholder makes the originals buffers, not parameters;
        # its storage is the old weight's, dropped after registration
        owner.register_buffer(attr, current.detach())
        del current
        parametrize.register_parametrization(owner, attr, param)
        if not getattr(owner, '_hawq_cache_hooks', False):
            owner.register_forward_pre_hook(_enter_cache)
            owner.register_forward_hook(_leave_cache, always_call=True)
            owner._hawq_cache_hooks = True
        attached[name] = param
    return attached


def _enter_cache(module: nn.Module, args: Any) -> None:
    context = parametrize.cached()
    context.__enter__()
    module.__dict__.setdefault('_hawq_cache_contexts', []).append(context)


def _leave_cache(module: nn.Module, args: Any, output: Any) -> None:
    contexts = module.__dict__.get('_hawq_cache_contexts')
    if contexts:
        contexts.pop().__exit__(None, None, None)


def load_packed(model: nn.Module,
                checkpoint: Mapping[str, Any],
                keep_packed: bool = True,
                source: Optional[str] = None) -> nn.Module:
    """Load a packed checkpoint, keeping the quantized weights packed.

    Args:
        model (nn.Module): The detector built from the checkpoint's config.
        checkpoint (Mapping): A loaded packed checkpoint (``meta``,
            ``state_dict``, ``packed``).
        keep_packed (bool): Keep each quantized weight as packed codes plus
            scale, dequantized when read (:class:`PackedWeight`); False
            loads the dequantized fp32 weights, i.e. the fake-quantized
            model. Defaults to True.
        source (str, optional): The checkpoint's file, for messages.
            Defaults to None.

    Returns:
        nn.Module: ``model``, loaded, in eval mode.

    Raises:
        HawqUserError: ``checkpoint`` is not packed, or its names or shapes
            do not fit the model.
    """
    what = f'checkpoint {source!r}' if source else 'the checkpoint'
    if not is_packed(checkpoint):
        raise HawqUserError(
            f'{what} is not a packed low-bit checkpoint: pass the packed.pth '
            'that DistillSensitivityHook or tools/ptq.py wrote')
    if not keep_packed:
        _load_strict(model, unpack_checkpoint(dict(checkpoint))['state_dict'],
                     what)
        return model.eval()
    state = checkpoint['state_dict']
    packed = checkpoint['packed']
    own = set(model.state_dict())
    missing = [k for k in own if k not in state and k not in packed]
    unexpected = [k for k in list(state) + list(packed) if k not in own]
    if missing or unexpected:
        raise HawqUserError(
            f'{what} does not fit the model: {len(missing)} missing key(s) '
            f'({short_list(missing, 3)}), {len(unexpected)} unexpected '
            f'key(s) ({short_list(unexpected, 3)}): pass a packed checkpoint '
            'written for this config\'s model')
    _load_strict(model, dict(state), what, allowed_missing=set(packed))
    attach_packed_weights(model, packed)
    return model.eval()


def _load_strict(model: nn.Module, state: Dict[str, torch.Tensor], what: str,
                 allowed_missing: Collection[str] = ()) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise HawqUserError(
            f'{what} does not fit the model: missing '
            f'{short_list(missing, 3) or "none"}, unexpected '
            f'{short_list(result.unexpected_keys, 3) or "none"}: pass a '
            'packed checkpoint written for this config\'s model')


def module_weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes the model's tensors hold, packed codes counted as stored.

    Args:
        model (nn.Module): A model, parametrized or not.

    Returns:
        dict[str, int]: ``parameters`` (float parameters), ``packed``
        (packed codes and their scales), ``buffers`` (the other buffers:
        batch-norm statistics, ...) and ``total``.
    """
    out = dict(parameters=0, packed=0, buffers=0)
    seen = set()
    for mod in model.modules():
        packed_mod = isinstance(mod, parametrize.ParametrizationList)
        for tensor in list(mod._parameters.values()) + list(
                mod._buffers.values()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            if packed_mod:
                out['packed'] += size
            elif isinstance(tensor, nn.Parameter):
                out['parameters'] += size
            else:
                out['buffers'] += size
    out['total'] = out['parameters'] + out['packed'] + out['buffers']
    return out

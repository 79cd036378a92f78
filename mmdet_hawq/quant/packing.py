"""Packed low-bit checkpoints: integer codes stored at their bit-width.

An ``n``-bit code ``c ∈ [-(2^(n-1)-1), 2^(n-1)-1]`` is stored as the unsigned
``c + 2^(n-1) - 1`` in exactly ``n`` bits, so a 4-bit weight takes half a
byte. A packed checkpoint is a dict::

    {'meta': {..., 'mmdet_hawq_packed': 1},
     'state_dict': {name: tensor},            # everything left in float
     'packed': {name: {'data': uint8 tensor, 'bits': int, 'shape': list,
                       'scale': tensor, 'axis': int | None}}}

:func:`unpack_checkpoint` turns it back into an ordinary mmengine checkpoint
whose weights are bit-identical to the fake-quantized model. The plugin's
checkpoint loader does this automatically, so ``load_from`` and
``--checkpoint`` accept packed files.
"""
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from .quantizer import QuantizedWeight, qmax

PACKED_KEY = 'mmdet_hawq_packed'
PACKED_VERSION = 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes into a flat uint8 tensor.

    Args:
        codes (Tensor): Integer codes in ``[-qmax, qmax]``, on any device.
        bits (int): Bit-width.

    Returns:
        Tensor: uint8, ``ceil(numel * bits / 8)`` bytes, on the CPU.
    """
    u = (codes.detach().reshape(-1).to('cpu', torch.int16) +
         qmax(bits)).numpy().astype(np.uint8)
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1),
                                        bitorder='little'))


def unpack_codes(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes, flat, ``numel`` long."""
    planes = np.unpackbits(data.cpu().numpy(), count=numel * bits,
                           bitorder='little').reshape(numel, bits)
    u = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(1)
    return torch.from_numpy((u - qmax(bits)).astype(np.int8))


def pack_state_dict(model: nn.Module,
                    quantized: Mapping[str, QuantizedWeight],
                    plan: Optional[Mapping[str, Optional[int]]] = None
                    ) -> Dict[str, Any]:
    """Packed checkpoint of a quantized model.

    Args:
        model (nn.Module): The detector (unwrapped), after
            :func:`~mmdet_hawq.quant.plan.apply_plan`.
        quantized (Mapping): What ``apply_plan`` returned: the codes and
            scales of the quantized weights, stored as they are, so the
            reloaded weights are bit-identical.
        plan (Mapping, optional): The plan, kept in ``meta``. Defaults to
            None.

    Returns:
        dict: ``state_dict`` (float part), ``packed`` and ``meta``, every
        tensor on the CPU (a checkpoint written from a GPU run loads
        anywhere).
    """
    packed, rest = {}, {}
    for name, tensor in model.state_dict().items():
        qw = quantized.get(name)
        if qw is None:
            rest[name] = tensor.cpu()
            continue
        packed[name] = dict(
            data=pack_codes(qw.codes, qw.bits), bits=qw.bits,
            shape=list(qw.codes.shape), scale=qw.scale.cpu(), axis=qw.axis)
    meta = {PACKED_KEY: PACKED_VERSION}
    if plan is not None:
        meta['plan'] = dict(plan)
    return dict(meta=meta, state_dict=rest, packed=packed)


def is_packed(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is a packed checkpoint of this plugin."""
    return isinstance(checkpoint, dict) and isinstance(
        checkpoint.get('meta'), dict) and PACKED_KEY in checkpoint['meta']


def unpack_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Ordinary checkpoint (``state_dict`` + ``meta``) from a packed one."""
    state = dict(checkpoint['state_dict'])
    for name, entry in checkpoint['packed'].items():
        shape = tuple(entry['shape'])
        numel = int(np.prod(shape)) if shape else 1
        codes = unpack_codes(entry['data'], entry['bits'], numel)
        qw = QuantizedWeight(codes.reshape(shape), entry['scale'],
                             entry['bits'], entry['axis'])
        state[name] = qw.dequantize(torch.float32)
    return dict(meta=dict(checkpoint['meta']), state_dict=state)

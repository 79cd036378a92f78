"""Packed low-bit checkpoints: integer codes stored at their bit-width.

An ``n``-bit code ``c ∈ [-(2^(n-1)-1), 2^(n-1)-1]`` is stored as the unsigned
``c + 2^(n-1) - 1`` in exactly ``n`` bits, so a 4-bit weight takes half a
byte. Every 8 codes fill exactly ``bits`` bytes of the stream. The one codec
(torch, on any device) works on byte planes, ``bits`` rows with row ``j``
holding byte ``j`` of every group of 8 (:func:`pack_planes`,
:func:`unpack_planes`): the packed checkpoint stores them as the stream, the
packed-in-memory model (:mod:`mmdet_hawq.deploy.packed_weights`) keeps the
planes. A packed checkpoint is a dict::

    {'meta': {..., 'mmdet_hawq_packed': 1},
     'state_dict': {name: tensor},            # everything left in float
     'packed': {name: {'data': uint8 tensor, 'bits': int, 'shape': list,
                       'scale': tensor, 'axis': int | None}}}

:func:`unpack_checkpoint` turns it back into an ordinary mmengine checkpoint
whose weights are bit-identical to the fake-quantized model. The plugin's
checkpoint loader does this automatically, so ``load_from`` and
``--checkpoint`` accept packed files.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .quantizer import QuantizedWeight, qmax

PACKED_KEY = 'mmdet_hawq_packed'
PACKED_VERSION = 1


def pack_planes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_planes` for unsigned codes (int64, any
    shape, on any device): byte planes (bits, ceil(numel / 8)), uint8."""
    numel = unsigned.numel()
    groups = -(-numel // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64,
                         device=unsigned.device)
    padded[:numel] = unsigned.reshape(-1)
    codes = padded.reshape(groups, 8)
    word = codes[:, 0].clone()
    for i in range(1, 8):  # OR, not sum: 8-bit fields reach the sign bit
        word.bitwise_or_(codes[:, i] << (i * bits))
    planes = [(word >> (8 * k)).bitwise_and_(255) for k in range(bits)]
    return torch.stack(planes).to(torch.uint8)


def pad_packed_codes(data: torch.Tensor, bits: int,
                     numel: int) -> torch.Tensor:
    """Packed codes rearranged for unpacking: byte planes.

    Every 8 codes fill exactly ``bits`` bytes of the packed stream; the
    stream is padded to whole groups of 8 and laid out as ``bits`` rows, row
    ``j`` holding byte ``j`` of every group. Same bytes, other order: each
    row is then read by contiguous (vectorised) shifts.

    Args:
        data (Tensor): uint8, ``ceil(numel * bits / 8)`` bytes, as
            :func:`pack_codes` writes them.
        bits (int): Bit-width, 2 to 8.
        numel (int): Number of codes.

    Returns:
        Tensor: uint8, shape (bits, ceil(numel / 8)), contiguous.
    """
    groups = -(-numel // 8)
    flat = data.reshape(-1).to(torch.uint8)
    if flat.numel() > groups * bits:
        raise ValueError(f'{flat.numel()} bytes hold more than {numel} '
                         f'{bits}-bit codes')
    if flat.numel() < groups * bits:
        flat = torch.cat([flat, flat.new_zeros(groups * bits - flat.numel())])
    return flat.reshape(groups, bits).t().contiguous()


#: Below this many codes a weight is unpacked by a few ops over all 8
#: codes of a group at once (fewer calls); above, code by code (fewer
#: passes over memory).
_SMALL = 1 << 16

_PLANE_INDEX: Dict[Tuple[int, torch.device], Tuple[torch.Tensor, ...]] = {}


def _plane_index(bits: int,
                 device: torch.device) -> Tuple[torch.Tensor, ...]:
    """For code ``k`` of a group of 8: its first byte plane, the next one
    (the last plane again at the end), the right shift, the left shift of
    the next plane (8: nothing) and the mask, as (8,) / (8, 1) tensors on
    ``device`` (made once per bit-width and device)."""
    if (bits, device) not in _PLANE_INDEX:
        first = [k * bits // 8 for k in range(8)]
        offset = [k * bits % 8 for k in range(8)]
        _PLANE_INDEX[bits, device] = (
            torch.tensor(first, device=device),
            torch.tensor([min(f + 1, bits - 1) for f in first],
                         device=device),
            torch.tensor(offset, dtype=torch.uint8, device=device)[:, None],
            torch.tensor([8 - o if o + bits > 8 else 8 for o in offset],
                         dtype=torch.uint8, device=device)[:, None])
    return _PLANE_INDEX[bits, device]


def unpack_planes(planes: torch.Tensor, bits: int,
                  numel: int) -> torch.Tensor:
    """Signed codes from byte planes.

    Code ``i`` is the unsigned value in bits ``[i*bits, (i+1)*bits)`` of the
    little-endian bit stream, minus ``2^(bits-1) - 1``. Code ``k`` of a
    group of 8 lies in at most two of the group's ``bits`` bytes, so it is
    read for all groups at once by uint8 shifts of one or two contiguous
    byte planes; the offset is subtracted modulo 256 and the bytes are
    viewed as int8.

    Args:
        planes (Tensor): uint8 (bits, ceil(numel / 8)) from
            :func:`pad_packed_codes`.
        bits (int): Bit-width, 2 to 8.
        numel (int): Number of codes.

    Returns:
        Tensor: int8 codes, shape (numel,).
    """
    mask = (1 << bits) - 1
    if numel < _SMALL:
        first, second, right, left = _plane_index(bits, planes.device)
        codes = (planes.index_select(0, first) >> right).bitwise_or_(
            planes.index_select(0, second) << left).bitwise_and_(mask)
        unsigned = codes.t().reshape(-1)[:numel]
    else:
        columns = []
        for k in range(8):
            first, offset = divmod(k * bits, 8)
            column = planes[first] >> offset if offset else planes[first]
            if offset + bits > 8:  # continues in the next byte
                column = column | (planes[first + 1] << (8 - offset))
            if offset + bits != 8:  # bits above the code's are set
                column = column & mask
            columns.append(column)
        unsigned = torch.stack(columns, 1).reshape(-1)[:numel]
    return unsigned.sub_(qmax(bits)).view(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes into a flat uint8 tensor.

    Args:
        codes (Tensor): Integer codes in ``[-qmax, qmax]``, on any device.
        bits (int): Bit-width.

    Returns:
        Tensor: uint8, ``ceil(numel * bits / 8)`` bytes (the little-endian
        bit stream), on the CPU.
    """
    unsigned = codes.detach().reshape(-1).to(torch.int64) + qmax(bits)
    planes = pack_planes(unsigned, bits)  # byte j of group g at [j, g]
    size = (unsigned.numel() * bits + 7) // 8
    return planes.t().reshape(-1)[:size].cpu()


def unpack_codes(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes, flat, ``numel`` long, on
    ``data``'s device."""
    return unpack_planes(pad_packed_codes(data, bits, numel), bits, numel)


def pack_state_dict(model: nn.Module,
                    quantized: Mapping[str, QuantizedWeight],
                    plan: Optional[Mapping[str, Any]] = None
                    ) -> Dict[str, Any]:
    """Packed checkpoint of a quantized model.

    Args:
        model (nn.Module): The detector (unwrapped), after
            :func:`~mmdet_hawq.quant.plan.apply_plan`.
        quantized (Mapping): What ``apply_plan`` returned: the codes and
            scales of the quantized weights, stored as they are, so the
            reloaded weights are bit-identical.
        plan (Mapping, optional): The plan (name →
            :class:`~mmdet_hawq.quant.plan.PlanEntry`); its bit-widths are
            kept in ``meta``. Defaults to None.

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
        meta['plan'] = {n: e.bits for n, e in plan.items()}
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
        numel = 1
        for size in shape:
            numel *= size
        codes = unpack_codes(entry['data'], entry['bits'], numel)
        qw = QuantizedWeight(codes.reshape(shape), entry['scale'],
                             entry['bits'], entry['axis'])
        state[name] = qw.dequantize(torch.float32)
    return dict(meta=dict(checkpoint['meta']), state_dict=state)

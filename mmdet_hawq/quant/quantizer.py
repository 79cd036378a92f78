"""The paper's symmetric linear weight quantizer (Eq. 6), as pure functions.

``Q(W) = round(W * (2^(n-1) - 1) / max|W|) * max|W| / (2^(n-1) - 1)``

``max|W|`` is taken over the whole tensor (per tensor, the paper's choice) or
over each output channel (``axis=0``). Integer codes lie in
``[-(2^(n-1) - 1), 2^(n-1) - 1]``: ``2^n - 1`` levels, symmetric around 0.
A tensor (or channel) that is all zeros gets scale 1 and codes 0, so it
survives quantization unchanged.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from ..errors import HawqUserError

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int, what: str = 'bit-width',
               null_ok: bool = False) -> int:
    """Return ``bits`` if it is an integer in ``[2, 8]``, else raise.

    Args:
        bits (int): The bit-width to check.
        what (str): How the value is named in the error. Defaults to
            ``'bit-width'``.
        null_ok (bool): Whether the error may suggest null (a plan entry
            can keep its weight in float; ``bits=`` and ``bit_range=``
            cannot). Defaults to False.

    Returns:
        int: ``bits``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (
            MIN_BITS <= bits <= MAX_BITS):
        null = ' (or null to keep the weight in float)' if null_ok else ''
        raise HawqUserError(
            f'{what} {bits!r} is not supported: use an integer from '
            f'{MIN_BITS} to {MAX_BITS}{null}')
    return bits


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many elements of ``tensor`` are NaN or ±Inf (0 for integers)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())


def qmax(bits: int) -> int:
    """Largest integer code of an ``bits``-bit symmetric quantizer."""
    return 2**(check_bits(bits) - 1) - 1


def choose_max_abs(weight: torch.Tensor,
                   axis: Optional[int] = None) -> torch.Tensor:
    """``max|W|`` per tensor (``axis=None``) or per slice along ``axis``.

    Args:
        weight (Tensor): The weight, any shape.
        axis (int, optional): Channel axis for per-channel ranges, usually 0
            (output channels). Defaults to None (per tensor).

    Returns:
        Tensor: A 0-d tensor, or one broadcastable to ``weight`` with size 1
        on every axis but ``axis``.
    """
    w = weight.detach()
    if axis is None:
        return w.abs().max()
    dims = [d for d in range(w.dim()) if d != axis % w.dim()]
    return w.abs().amax(dim=dims, keepdim=True)


def choose_scale(weight: torch.Tensor, bits: int,
                 axis: Optional[int] = None) -> torch.Tensor:
    """The quantization step ``max|W| / (2^(n-1) - 1)`` (1 where max is 0).

    A tensor with a NaN or Inf is refused (it would otherwise become a
    plausible-looking tensor of zeros or NaNs).

    Args:
        weight (Tensor): The weight, any shape.
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.

    Returns:
        Tensor: Scale, shaped as :func:`choose_max_abs` returns.

    Raises:
        ValueError: ``weight`` has a NaN or Inf element.
    """
    max_abs = choose_max_abs(weight, axis)
    if not bool(torch.isfinite(max_abs).all()):  # NaN and Inf propagate
        raise ValueError(
            f'cannot quantize a tensor of shape {tuple(weight.shape)} with '
            f'{count_nonfinite(weight)} non-finite (NaN/Inf) element(s)')
    scale = max_abs / qmax(bits)
    return torch.where(max_abs > 0, scale, torch.ones_like(scale))


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Integer codes ``round(W / scale)``, clamped to ``±(2^(n-1) - 1)``.

    Args:
        weight (Tensor): The weight.
        scale (Tensor): From :func:`choose_scale`.
        bits (int): Bit-width, 2 to 8.

    Returns:
        Tensor: int8 codes with the shape of ``weight``.
    """
    q = qmax(bits)
    codes = torch.round(weight.detach() / scale).clamp_(-q, q)
    return codes.to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weights ``codes * scale`` on the quantization grid.

    Args:
        codes (Tensor): Integer codes.
        scale (Tensor): The scale used to make them.
        dtype (torch.dtype): Output dtype. Defaults to ``torch.float32``.

    Returns:
        Tensor: Dequantized weights.
    """
    return codes.to(dtype) * scale.to(dtype)


@dataclass
class QuantizedWeight:
    """A weight quantized to ``bits``: ``dequantize(codes, scale)``.

    Attributes:
        codes (Tensor): int8 codes, shape of the weight.
        scale (Tensor): 0-d (per tensor) or broadcastable (per channel).
        bits (int): Bit-width.
        axis (int, optional): Channel axis, None for per tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    axis: Optional[int] = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weights on the grid."""
        return dequantize(self.codes, self.scale, dtype)


def quantize_weight(weight: torch.Tensor, bits: int,
                    axis: Optional[int] = None) -> QuantizedWeight:
    """Quantize ``weight`` with Eq. 6; codes and scale.

    Args:
        weight (Tensor): The weight.
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.

    Returns:
        QuantizedWeight: Codes, scale, bits and axis.

    Raises:
        ValueError: ``weight`` has a NaN or Inf element.
    """
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()  # fp16/bf16 weights are quantized in fp32
    scale = choose_scale(w, bits, axis)
    return QuantizedWeight(quantize_codes(w, scale, bits), scale, bits, axis)


def fake_quantize(weight: torch.Tensor, bits: int,
                  axis: Optional[int] = None) -> torch.Tensor:
    """Eq. 6: float weights on the ``bits``-bit grid, dtype of ``weight``.

    Args:
        weight (Tensor): The weight.
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.

    Returns:
        Tensor: ``Q(W)``, same shape and dtype as ``weight``.
    """
    return quantize_weight(weight, bits, axis).dequantize(weight.dtype)


def quantization_error(weight: torch.Tensor, bits: int,
                       reference: Optional[torch.Tensor] = None,
                       axis: Optional[int] = None) -> float:
    """``||Q_b(W) - W_ref||²``, with ``W_ref = W`` unless given.

    Args:
        weight (Tensor): The float weight ``W``.
        bits (int): Bit-width of ``Q_b``.
        reference (Tensor, optional): ``W_ref`` (e.g. the 8-bit weights).
            Defaults to None (``W`` itself).
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.

    Returns:
        float: The squared L2 error, in float64.
    """
    ref = weight if reference is None else reference
    diff = fake_quantize(weight, bits, axis).double() - ref.detach().double()
    return float((diff * diff).sum())


def error_terms(weights: Mapping[str, torch.Tensor], bits: Sequence[int],
                axis: Optional[int] = None,
                reference_bits: Optional[int] = None
                ) -> Dict[str, Dict[int, float]]:
    """The ILP's error terms ``e_l(b) = ||Q_b(W_l) - W_ref||²``.

    Args:
        weights (Mapping[str, Tensor]): Float weights by name.
        bits (Sequence[int]): Candidate bit-widths.
        axis (int, optional): Channel axis; None for per tensor. Defaults to
            None.
        reference_bits (int, optional): ``W_ref = Q_{reference_bits}(W)``
            (8 for Out Sen Quant, whose Hessian is taken at the 8-bit
            weights). Defaults to None (``W_ref = W``).

    Returns:
        dict: name → {bits → error}, in float64.
    """
    out = {}
    for name, weight in weights.items():
        w = weight.detach()
        ref = None if reference_bits is None else fake_quantize(
            w, reference_bits, axis)
        out[name] = {b: quantization_error(w, b, ref, axis) for b in bits}
    return out


def named_weights(model: torch.nn.Module,
                  names: Iterable[str]) -> Dict[str, torch.nn.Parameter]:
    """The model's parameters by name (shared ones under every name), after
    checking that a plan's ``names`` are among them.

    Raises:
        HawqUserError: A name the model does not have.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in names if n not in params]
    if unknown:
        raise HawqUserError(
            f'the precision plan names {len(unknown)} weight(s) '
            f'{type(model).__name__} does not have, e.g. {unknown[:3]}')
    return params

"""ONNX export of a DETR-family detector with its quantized weights stored as
integers.

The exported network maps one image, as mmdet's test pipeline loads it
(float32 ``(1, 3, H, W)``, the pipeline's channel order, 0–255), to the class
scores ``(L, 1, Q, C)`` and normalised ``(cx, cy, w, h)`` boxes
``(L, 1, Q, 4)`` of every decoder layer (or of the last one only): the
detector's data preprocessor (channel flip, mean and std) is part of the
graph, mmdet's post-processing (``predict_by_feat``) is not.

Each quantized weight of a packed checkpoint is an integer initializer plus
its fp32 scale (and a zero point of 0) with a ``DequantizeLinear`` in front
of its consumer: weights of at most 4 bits as ``INT4`` (opset 21), of 5–8
bits as ``INT8``; the other weights stay fp32. How: the detector is traced by
torch's TorchScript exporter with every quantized weight replaced by a
parametrization whose op exports as ``DequantizeLinear`` over an int8
initializer (:class:`OnnxQuantizedWeight`); then, with the ``onnx``
package's own APIs, the data-movement ops between a weight and its consumer
(the q/k/v ``Slice`` and ``Transpose`` of an attention's packed projection)
are applied to the integer codes, the 4-bit codes are re-stored as
``INT4``, every codes initializer gets a zero point of its type, and the
model is converted to opset 21 and checked (:func:`lower_quantized_weights`).

What the graph outputs, and how its outputs become detections, is the
detector's family adapter's answer (:func:`~mmdet_hawq.models.onnx_outputs`,
:func:`~mmdet_hawq.models.predict_from_outputs`). mmcv ops take their
pure-PyTorch paths for tensors on the CPU (e.g. multi-scale deformable
attention through ``grid_sample``), so the export always runs on the CPU.
"""
import copy
import os
import os.path as osp
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import onnx
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import HawqUserError, short_list
from ..quant.activations import (ActivationRange,
                                 attach_activation_quantizers, sites_of)
from .onnx_integer import (concat_before_transpose, fold_constant_branches,
                           fold_static_shapes, integer_layout, matmul_nbits)
from .onnx_lowering import (ONNX_OPSET, lower_quantized_weights,
                            onnx_weight_summary, opset_of, set_weight_bits)
from ..models.family import onnx_outputs
from .packed_weights import packed_entry_codes, split_weight_name

__all__ = [
    'EXPORT_OPSET', 'FLOAT_MIN_OPSET', 'OnnxQuantizedWeight',
    'DequantizeLinearFunction',
    'DetectorOnnxWrapper', 'attach_onnx_quantized_weights', 'check_opset',
    'stores_int4',
    'export_onnx', 'operator_layers'
]

#: Opset of torch's TorchScript exporter run (its highest).
EXPORT_OPSET = 20
#: Lowest opset of a float export: ``GridSample`` (deformable attention).
FLOAT_MIN_OPSET = 16


class DequantizeLinearFunction(torch.autograd.Function):
    """``codes * scale`` that exports as ONNX ``DequantizeLinear``.

    The forward pass computes exactly
    :func:`~mmdet_hawq.quant.quantizer.dequantize` (float32 codes times
    float32 scale, elementwise), so the traced model gives the fake-quantized
    model's outputs.
    """

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor,
                axis: Optional[int]) -> torch.Tensor:
        """Dequantize.

        Args:
            ctx (Any): Autograd context (unused).
            codes (Tensor): int8 codes, the weight's shape.
            scale (Tensor): 0-d (per tensor) or 1-D of the size of
                ``codes``' dimension ``axis``.
            axis (int, optional): Channel axis of a 1-D scale.

        Returns:
            Tensor: float32 weight.
        """
        if axis is not None:
            shape = [1] * codes.dim()
            shape[axis] = -1
            scale = scale.reshape(shape)
        return codes.to(torch.float32) * scale.to(torch.float32)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any,
                 axis: Optional[int]) -> Any:
        """``DequantizeLinear(codes, scale)``; the zero point is added later
        (:func:`lower_quantized_weights`)."""
        if axis is None:
            return g.op('DequantizeLinear', codes, scale)
        return g.op('DequantizeLinear', codes, scale, axis_i=axis)


def quantize_dequantize(rng: ActivationRange, x: torch.Tensor
                        ) -> torch.Tensor:
    """``rng``'s fake quantization of ``x``, exported as ONNX
    ``QuantizeLinear`` → ``DequantizeLinear`` with uint8 codes and a zero
    point (``torch.fake_quantize_per_tensor_affine``'s ONNX form): the pair
    ONNX Runtime fuses with a weight's ``DequantizeLinear`` into an integer
    kernel. ONNX Runtime divides by the scale, as
    :meth:`~mmdet_hawq.quant.activations.ActivationRange.fake_quantize`
    does.

    Raises:
        HawqUserError: ``rng`` is not 8-bit (ONNX has no narrower QDQ
            activation type before opset 21's INT4, which ONNX Runtime's
            integer kernels do not take).
    """
    if rng.bits != 8:
        raise HawqUserError(
            f'activations at {rng.bits} bits have no integer kernel in '
            'ONNX Runtime: export 8-bit activations')
    scale, zero = rng.qparams()
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero),
                                                 0, 255)


class OnnxQuantizedWeight(nn.Module):
    """Parametrization for export: int8 codes and scale → the weight.

    Its originals are buffers: ``original0`` the int8 codes (the weight's
    shape) and ``original1`` the fp32 scale (0-d, or 1-D along ``axis``).

    Args:
        codes (Tensor): int8 codes.
        scale (Tensor): The quantizer's scale (0-d, or broadcastable to the
            weight with size 1 off ``axis``).
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): Channel axis of a per-channel scale. Defaults
            to None.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                 axis: Optional[int] = None) -> None:
        super().__init__()
        self.bits = bits
        self.axis = None if axis is None else axis % codes.dim()
        scale = scale.detach().to(torch.float32)
        self._pending = (codes.to(torch.int8),
                         scale.reshape(()) if axis is None else
                         scale.reshape(-1))

    def forward(self, codes: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """The float32 weight, exported as ``DequantizeLinear``."""
        return DequantizeLinearFunction.apply(codes, scale, self.axis)

    def right_inverse(
            self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The codes and scale given at construction (registration only)."""
        if self._pending is None:
            raise RuntimeError('an exported quantized weight is read-only')
        pending, self._pending = self._pending, None
        return pending


def attach_onnx_quantized_weights(model: nn.Module,
                                  packed: Mapping[str, Mapping]
                                  ) -> Dict[str, int]:
    """Replace each packed weight by an :class:`OnnxQuantizedWeight`.

    Args:
        model (nn.Module): The detector (modified in place).
        packed (Mapping[str, Mapping]): The ``packed`` part of a packed
            checkpoint.

    Returns:
        dict[str, int]: Weight name → bits.
    """
    bits = {}
    for name, entry in packed.items():
        owner, attr = split_weight_name(model, name)
        current = getattr(owner, attr)
        codes = packed_entry_codes(entry)
        if tuple(codes.shape) != tuple(current.shape):
            raise HawqUserError(
                f'the packed weight {name!r} has shape '
                f'{tuple(codes.shape)}, the model\'s '
                f'{tuple(current.shape)}: pass a packed checkpoint written '
                'for this config\'s model')
        if attr in owner._parameters:
            del owner._parameters[attr]
        owner.register_buffer(attr, current.detach())
        parametrize.register_parametrization(
            owner, attr,
            OnnxQuantizedWeight(codes, entry['scale'], entry['bits'],
                                entry['axis']),
            unsafe=True)
        bits[name] = int(entry['bits'])
    return bits


class DetectorOnnxWrapper(nn.Module):
    """Image → every decoder layer's class scores and boxes.

    Args:
        detector (nn.Module): An mmdet DETR-family detector in eval mode.
        input_shape (tuple[int, int]): ``(H, W)`` of the image, fixed in the
            graph (DETR builds its padding masks from it).
        last_layer_only (bool): Return the last decoder layer's outputs
            only (``L = 1``). Defaults to False.
    """

    def __init__(self, detector: nn.Module, input_shape: Tuple[int, int],
                 last_layer_only: bool = False) -> None:
        super().__init__()
        self.detector = detector
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.last_layer_only = last_layer_only
        pre = detector.data_preprocessor
        self.channel_flip = bool(getattr(pre, '_channel_conversion', False))
        self.normalize = bool(getattr(pre, '_enable_normalize', False))

    def forward(self, image: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the network.

        Args:
            image (Tensor): (1, 3, H, W) float32, the pipeline's channel
                order, 0–255.

        Returns:
            tuple[Tensor, Tensor]: Scores (L, 1, Q, C) and normalised
            (cx, cy, w, h) boxes (L, 1, Q, 4).
        """
        from mmdet.structures import DetDataSample
        pre = self.detector.data_preprocessor
        x = image
        if self.channel_flip:
            x = x[:, [2, 1, 0], ...]
        x = x.float()
        if self.normalize:
            x = (x - pre.mean) / pre.std
        sample = DetDataSample(metainfo=dict(
            img_shape=self.input_shape, batch_input_shape=self.input_shape,
            pad_shape=self.input_shape))
        scores, boxes = onnx_outputs(
            self.detector, dict(inputs=x, data_samples=[sample]))
        if self.last_layer_only:
            scores, boxes = scores[-1:], boxes[-1:]
        return scores, boxes


def _codes_names(packed: Mapping[str, Mapping]) -> Dict[str, str]:
    """Initializer name of each weight's codes in the traced model."""
    out = {}
    for name in packed:
        prefix, _, attr = name.rpartition('.')
        path = f'detector.{prefix}' if prefix else 'detector'
        out[f'{path}.parametrizations.{attr}.original0'] = name
    return out


def export_onnx(detector: nn.Module,
                out_file: str,
                input_shape: Tuple[int, int],
                packed: Optional[Mapping[str, Mapping]] = None,
                last_layer_only: bool = False,
                opset: int = ONNX_OPSET,
                activations: Optional[Mapping[str, ActivationRange]] = None,
                int4_matmul: bool = False) -> Dict[str, Any]:
    """Export ``detector`` to ONNX, quantized weights as integers.

    Args:
        detector (nn.Module): The detector with its weights loaded (the
            fake-quantized ones for a packed checkpoint); not modified.
        out_file (str): The ``.onnx`` file to write.
        input_shape (tuple[int, int]): ``(H, W)`` of the input image.
        packed (Mapping[str, Mapping], optional): The ``packed`` part of a
            packed checkpoint: these weights are stored as INT4/INT8 codes
            with ``DequantizeLinear``. Defaults to None (every weight fp32).
        last_layer_only (bool): Outputs of the last decoder layer only.
            Defaults to False.
        opset (int): Opset of the written model (see :func:`check_opset`).
            Defaults to :data:`ONNX_OPSET`.
        activations (Mapping[str, ActivationRange], optional): Activation
            site → range (a run's ``activations.json``): each site's tensor
            gets a uint8 ``QuantizeLinear`` → ``DequantizeLinear`` pair, every
            weight's codes are stored as ``INT8`` and the graph gets the
            integer-kernel layout (:func:`~.onnx_integer.integer_layout`).
            Defaults to None (float activations).
        int4_matmul (bool): Give the ``MatMul`` of every weight of at most 4
            bits ONNX Runtime's ``MatMulNBits`` (:func:`~.onnx_integer.
            matmul_nbits`). Defaults to False.

    Returns:
        dict: ``file``, ``bytes``, ``opset``, ``unused_weights`` (packed
        weights inference does not read, e.g. DINO's denoising label
        embedding), ``folded_weights`` (read only by a branch that does not
        depend on the image, computed at export: :func:`~.onnx_integer.
        fold_constant_branches`), the counts of the graph rewrites
        (``static_shapes``, ``constant_branches``; with activations
        ``concats_before_transpose`` and :func:`~.onnx_integer.
        integer_layout`'s) and :func:`onnx_weight_summary`'s counts.

    Raises:
        HawqUserError: The opset cannot hold the model, or an operator of
            the model has no ONNX form (named with the layers that use it).
    """
    check_opset(opset, stores_int4(packed, activations))
    model = copy.deepcopy(detector).cpu().eval()
    model.requires_grad_(False)
    bits = attach_onnx_quantized_weights(model, packed) if packed else {}
    if activations:
        attach_activation_quantizers(sites_of(model, activations),
                                     activations, quantize_dequantize)
    wrapper = DetectorOnnxWrapper(model, input_shape, last_layer_only)
    image = torch.zeros(1, 3, *wrapper.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        traced = osp.join(tmp, 'traced.onnx')
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # TracerWarnings: fixed shapes
            try:
                torch.onnx.export(
                    wrapper, (image, ), traced, dynamo=False,
                    opset_version=min(opset, EXPORT_OPSET),
                    input_names=['image'], output_names=['scores', 'boxes'],
                    do_constant_folding=True)
            except torch.onnx.errors.UnsupportedOperatorError as err:
                raise _unsupported(err, wrapper, image) from None
        proto = onnx.load(traced)
    proto = lower_quantized_weights(proto, _codes_names(packed or {}), bits,
                                    opset, int8_codes=bool(activations))
    read = onnx_weight_summary(proto)['weight_bits']
    layout = dict(static_shapes=fold_static_shapes(proto),
                  constant_branches=fold_constant_branches(proto))
    stored = {t.name.rsplit('.codes', 1)[0] for t in proto.graph.initializer}
    set_weight_bits(proto, {n: b for n, b in read.items() if n in stored})
    if activations:
        layout.update(integer_layout(proto),
                      concats_before_transpose=concat_before_transpose(proto))
    onnx.checker.check_model(proto, full_check=True)
    if int4_matmul:  # a com.microsoft op: after the ONNX checker
        layout['matmul_nbits'] = matmul_nbits(proto)
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    onnx.save(proto, out_file)
    summary = onnx_weight_summary(proto)
    return dict(file=out_file, bytes=osp.getsize(out_file),
                opset=opset_of(proto),
                unused_weights=sorted(set(bits) - set(read)),
                folded_weights=sorted(set(read) -
                                      set(summary['weight_bits'])),
                **layout, **summary)


def check_opset(opset: int, int4: bool) -> None:
    """Stop unless a model can be written at ``opset``.

    Weights stored as ``INT4`` (weights of at most 4 bits without integer
    activations, :func:`stores_int4`) need opset 21 (``DequantizeLinear``
    over INT4); any other model, float or with ``INT8`` codes, needs
    :data:`FLOAT_MIN_OPSET` (``GridSample``); no model goes above
    :data:`ONNX_OPSET`, the newest ONNX Runtime 1.20 runs.

    Args:
        opset (int): The requested opset.
        int4 (bool): Whether the model stores ``INT4`` weights.

    Raises:
        HawqUserError: One line naming the opset needed.
    """
    if opset > ONNX_OPSET:
        raise HawqUserError(
            f'opset {opset} is newer than ONNX Runtime 1.20 runs: pass '
            f'--opset {ONNX_OPSET} or lower')
    if opset < ONNX_OPSET and int4:
        raise HawqUserError(
            f'opset {opset} is too old for the INT4 weights: '
            f'DequantizeLinear takes INT4 weights from opset {ONNX_OPSET} '
            f'on; pass --opset {ONNX_OPSET}, or --float-weights for an fp32 '
            'model at an older opset')
    if opset < FLOAT_MIN_OPSET:
        raise HawqUserError(
            f'opset {opset} is too old for this exporter: GridSample '
            f'(deformable attention) needs opset {FLOAT_MIN_OPSET}; pass '
            f'--opset {FLOAT_MIN_OPSET} to {ONNX_OPSET}')


def stores_int4(packed: Optional[Mapping[str, Mapping]],
                activations: Optional[Mapping[str, Any]]) -> bool:
    """Whether :func:`export_onnx` stores some weight as ``INT4``: one of
    at most 4 bits, unless the activations are quantized (the integer
    kernels take ``INT8`` codes of every weight)."""
    return not activations and any(
        int(e['bits']) <= 4 for e in (packed or {}).values())


def operator_layers(wrapper: nn.Module, image: torch.Tensor,
                    op: str) -> List[str]:
    """The layers (module names) whose forward runs the TorchScript op
    ``op``, e.g. ``'aten::special_bessel_j0'``, found by tracing once."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        graph = torch.jit.trace(wrapper, (image, ),
                                check_trace=False).inlined_graph
    layers = []
    for node in graph.nodes():
        if node.kind() == op:
            scope = node.scopeName().rpartition('/')[2]
            name = re.sub(r'^__module\.(detector\.)?', '', scope)
            if name and name not in layers:
                layers.append(name)
    return layers


def _unsupported(err: Exception, wrapper: nn.Module,
                 image: torch.Tensor) -> HawqUserError:
    """One line for an operator torch's exporter has no ONNX form of."""
    found = re.search(r"operator '([^']+)'", str(err))
    op = found.group(1) if found else str(err).splitlines()[0]
    layers = operator_layers(wrapper, image, op) if found else []
    where = (f'used by {short_list(layers)}' if layers else
             'used outside any submodule')
    return HawqUserError(
        f'operator {op} has no ONNX export in torch {torch.__version__} '
        f'({where}): replace that layer with ONNX-exportable ops, or '
        'register a symbolic for it (torch.onnx.register_custom_op_symbolic)')

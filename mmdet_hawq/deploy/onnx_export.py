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
import json
import os
import os.path as osp
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from torch.nn.utils import parametrize

from ..errors import HawqUserError, short_list
from ..models.family import onnx_outputs
from .packed_weights import packed_entry_codes, split_weight_name

__all__ = [
    'DequantizeLinearFunction', 'DetectorOnnxWrapper', 'EXPORT_OPSET',
    'FLOAT_MIN_OPSET', 'ONNX_OPSET', 'OnnxQuantizedWeight',
    'attach_onnx_quantized_weights', 'check_opset', 'export_onnx',
    'lower_quantized_weights', 'onnx_weight_summary', 'operator_layers',
    'pack_int4'
]

#: Opset of torch's TorchScript exporter run (its highest).
EXPORT_OPSET = 20
#: Opset of the written model: ``DequantizeLinear`` takes INT4 from 21 on.
ONNX_OPSET = 21
#: Lowest opset of a float export: ``GridSample`` (deformable attention).
FLOAT_MIN_OPSET = 16
#: ``metadata_props`` key holding the JSON map weight name → bits.
BITS_KEY = 'mmdet_hawq.weight_bits'


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
                opset: int = ONNX_OPSET) -> Dict[str, Any]:
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

    Returns:
        dict: ``file``, ``bytes``, ``opset``, ``unused_weights`` (packed
        weights inference does not read, e.g. DINO's denoising label
        embedding) and :func:`onnx_weight_summary`'s counts.

    Raises:
        HawqUserError: The opset cannot hold the model, or an operator of
            the model has no ONNX form (named with the layers that use it).
    """
    check_opset(opset, bool(packed))
    model = copy.deepcopy(detector).cpu().eval()
    model.requires_grad_(False)
    bits = attach_onnx_quantized_weights(model, packed) if packed else {}
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
                                    opset)
    onnx.checker.check_model(proto, full_check=True)
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    onnx.save(proto, out_file)
    summary = onnx_weight_summary(proto)
    unused = sorted(set(bits) - set(summary['weight_bits']))
    return dict(file=out_file, bytes=osp.getsize(out_file),
                opset=_opset(proto), unused_weights=unused, **summary)


def check_opset(opset: int, quantized: bool) -> None:
    """Stop unless a model can be written at ``opset``.

    Integer weights need opset 21 (``DequantizeLinear`` over INT4); a float
    model needs :data:`FLOAT_MIN_OPSET` (``GridSample``); no model goes
    above :data:`ONNX_OPSET`, the newest ONNX Runtime 1.20 runs.

    Args:
        opset (int): The requested opset.
        quantized (bool): Whether the model has integer weights.

    Raises:
        HawqUserError: One line naming the opset needed.
    """
    low = ONNX_OPSET if quantized else FLOAT_MIN_OPSET
    if opset > ONNX_OPSET:
        raise HawqUserError(
            f'opset {opset} is newer than ONNX Runtime 1.20 runs: pass '
            f'--opset {ONNX_OPSET} or lower')
    if opset < low and quantized:
        raise HawqUserError(
            f'opset {opset} is too old for the integer weights: '
            f'DequantizeLinear takes INT4 weights from opset {ONNX_OPSET} '
            f'on; pass --opset {ONNX_OPSET}, or --float-weights for an fp32 '
            'model at an older opset')
    if opset < low:
        raise HawqUserError(
            f'opset {opset} is too old for this exporter: GridSample '
            f'(deformable attention) needs opset {FLOAT_MIN_OPSET}; pass '
            f'--opset {FLOAT_MIN_OPSET} to {ONNX_OPSET}')


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


def _opset(proto: onnx.ModelProto) -> int:
    return max(o.version for o in proto.opset_import
               if o.domain in ('', 'ai.onnx'))


#: Data-movement ops whose effect on a weight is applied to its integer
#: codes at export (per-tensor scale), so that every ``DequantizeLinear``
#: feeds a compute op; with a per-channel scale, the ones whose channel
#: axis is followed.
LAYOUT_OPS = ('Slice', 'Transpose', 'Reshape', 'Unsqueeze', 'Squeeze',
              'Flatten', 'Identity', 'Expand', 'Tile')
PER_CHANNEL_LAYOUT_OPS = ('Slice', 'Transpose', 'Unsqueeze', 'Identity')


@dataclass
class _Codes:
    """A tensor of a weight's codes during lowering."""

    weight: str
    codes: np.ndarray  # int8
    scale: np.ndarray  # float32, 0-d or 1-D along ``axis``
    axis: Optional[int]


class _Constants:
    """Constant values of a graph: initializers, ``Constant`` nodes, the
    ``Shape`` of tensors of known shape, and small values computed from
    those (the q/k/v split points of an attention's packed projection are
    computed from its weight's shape)."""

    #: Largest value computed here (elements): shape arithmetic only.
    MAX_ELEMENTS = 4096

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.values = {t.name: numpy_helper.to_array(t)
                       for t in graph.initializer}
        for node in graph.node:
            if node.op_type == 'Constant' and node.attribute and \
                    node.attribute[0].name == 'value':
                self.values[node.output[0]] = numpy_helper.to_array(
                    node.attribute[0].t)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.shapes: Dict[str, Tuple[int, ...]] = {}

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: str) -> np.ndarray:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def shape_of(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        """The value of a ``Shape`` node over a tensor of known shape."""
        shape = self.shapes.get(node.input[0])
        if shape is None:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get('start', 0), attrs.get('end', len(shape))
        return np.array(shape[start:end], dtype=np.int64)

    def get(self, name: str, depth: int = 0) -> Optional[np.ndarray]:
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is None or depth > 16 or node.op_type in (
                'DequantizeLinear', 'RandomNormal', 'RandomUniform',
                'RandomNormalLike', 'RandomUniformLike', 'Multinomial'):
            return None
        if node.op_type == 'Shape':
            value = self.shape_of(node)
        else:
            inputs = {i: self.get(i, depth + 1) for i in node.input if i}
            if any(v is None for v in inputs.values()):
                return None
            from onnx.reference import ReferenceEvaluator
            value = ReferenceEvaluator(node).run(None, inputs)[
                list(node.output).index(name)]
        if value is None or np.size(value) > self.MAX_ELEMENTS:
            return None
        self.values[name] = value
        return value


def _fold_layout(node: onnx.NodeProto, src: _Codes,
                 consts: _Constants) -> Optional[_Codes]:
    """``node`` applied to ``src``'s codes (its other inputs constant), or
    None where it cannot be folded."""
    allowed = LAYOUT_OPS if src.axis is None else PER_CHANNEL_LAYOUT_OPS
    if node.op_type not in allowed or node.domain not in ('', 'ai.onnx'):
        return None
    if any(i not in consts for i in node.input[1:] if i):
        return None
    from onnx.reference import ReferenceEvaluator
    run = ReferenceEvaluator(node)

    def apply(values: np.ndarray) -> np.ndarray:
        feeds = {node.input[0]: values}
        feeds.update({i: consts[i] for i in node.input[1:] if i})
        return run.run(None, feeds)[0]

    codes = apply(src.codes).astype(np.int8)
    if codes.size > src.codes.size:  # Expand/Tile that copy: keep float
        return None
    if src.axis is None or node.op_type == 'Identity':
        return _Codes(src.weight, codes, src.scale, src.axis)
    if node.op_type == 'Unsqueeze':
        axes = {int(a) % codes.ndim for a in consts[node.input[1]].ravel()}
        kept_dims = [d for d in range(codes.ndim) if d not in axes]
        return _Codes(src.weight, codes, src.scale, kept_dims[src.axis])
    if node.op_type == 'Transpose':
        perm = [a.ints for a in node.attribute if a.name == 'perm']
        perm = list(perm[0]) if perm else list(range(codes.ndim))[::-1]
        return _Codes(src.weight, codes, src.scale, perm.index(src.axis))
    shape = [1] * src.codes.ndim
    shape[src.axis] = -1
    index = np.broadcast_to(
        np.arange(src.codes.shape[src.axis]).reshape(shape),
        src.codes.shape).copy()
    kept = np.moveaxis(apply(index), src.axis, 0).reshape(
        codes.shape[src.axis], -1)[:, 0] if codes.size else \
        np.zeros(0, np.int64)
    return _Codes(src.weight, codes, src.scale[kept], src.axis)


def lower_quantized_weights(proto: onnx.ModelProto,
                            codes_names: Mapping[str, str],
                            bits: Mapping[str, int],
                            opset: int = ONNX_OPSET) -> onnx.ModelProto:
    """Store the traced int8 codes at their ONNX type; the final opset.

    Every ``DequantizeLinear`` of the traced model reads a weight's int8
    codes. First, the data-movement ops that follow it with constant
    parameters (:data:`LAYOUT_OPS`: e.g. the ``Slice`` and ``Transpose``
    that split ``nn.MultiheadAttention``'s ``in_proj_weight`` into q, k, v)
    are applied to the codes here, once, so that each ``DequantizeLinear``
    feeds a compute op (``Conv``, ``Gemm``, ``MatMul``, ...). This is exact
    (the scale is per tensor, or followed along its axis), and it keeps
    ONNX Runtime's QDQ propagation from re-quantizing such weights at run
    time: with INT4 codes that pass corrupts the heap in onnxruntime
    1.20-1.23 (wrong outputs, ``free(): invalid next size``).

    Then each codes tensor becomes an initializer ``<weight>.codes`` (or
    ``<weight>.codes.<k>`` for the k-th derived one): ``INT4`` when the
    weight has at most 4 bits, else ``INT8``; the scale ``<weight>.scale``
    and a zero point of 0 of the codes' type, ``<weight>.zero_point`` (with
    ``.<k>`` for a derived per-channel scale). The model is converted to
    ``opset`` (``onnx.version_converter``) and the bits are recorded in its
    ``metadata_props`` (``mmdet_hawq.weight_bits``).

    Args:
        proto (onnx.ModelProto): The traced model (opset 20 or lower).
        codes_names (Mapping[str, str]): Codes initializer name → weight.
        bits (Mapping[str, int]): Weight → bits; a weight the graph does
            not read is left out of the recorded bits.
        opset (int): Opset of the model returned (21 with integer weights).
            Defaults to :data:`ONNX_OPSET`.

    Returns:
        onnx.ModelProto: The model to save.

    Raises:
        RuntimeError: A ``DequantizeLinear`` reads something else than a
            weight's codes.
    """
    graph = proto.graph
    consts = _Constants(graph)
    sources: Dict[str, _Codes] = {}
    removed = set()
    for index, node in enumerate(graph.node):
        if node.op_type != 'DequantizeLinear':
            continue
        weight = codes_names.get(node.input[0])
        if weight is None:
            raise RuntimeError(f'DequantizeLinear {node.name} reads '
                               f'{node.input[0]!r}, not a weight\'s codes')
        axis = [a.i for a in node.attribute if a.name == 'axis']
        sources[node.output[0]] = _Codes(
            weight, consts[node.input[0]].astype(np.int8),
            consts[node.input[1]].astype(np.float32),
            axis[0] if axis else None)
        consts.shapes[node.output[0]] = consts[node.input[0]].shape
        removed.add(index)
    # a weight the inference graph does not read (DINO's denoising label
    # embedding, used in training only) is not in it
    bits = {w: b for w, b in bits.items()
            if w in {c.weight for c in sources.values()}}
    consumers: Dict[str, list] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}
    shape_nodes = []
    pending = list(sources)
    while pending:
        name = pending.pop()
        for index in consumers.get(name, []):
            node = graph.node[index]
            if index in removed or node.input[0] != name:
                continue
            if node.op_type == 'Shape':  # a constant: the shape is known
                shape_nodes.append(helper.make_node(
                    'Constant', [], [node.output[0]], name=node.name,
                    value=numpy_helper.from_array(consts.shape_of(node))))
                removed.add(index)
                continue
            folded = _fold_layout(node, sources[name], consts)
            if folded is not None:
                sources[node.output[0]] = folded
                consts.shapes[node.output[0]] = folded.codes.shape
                removed.add(index)
                pending.append(node.output[0])
    needed = [name for name in sources
              if name in outputs or any(
                  i not in removed for i in consumers.get(name, []))]
    new_inits, new_nodes = [], []
    made: Dict[str, int] = {}
    for name in needed:
        src = sources[name]
        k = made.get(src.weight, 0)
        made[src.weight] = k + 1
        suffix = f'.{k}' if k else ''
        dtype = TensorProto.INT4 if bits[src.weight] <= 4 else \
            TensorProto.INT8
        codes_t = _int_tensor(f'{src.weight}.codes{suffix}', src.codes,
                              dtype)
        scale_suffix = suffix if src.axis is not None else ''
        scale_name = f'{src.weight}.scale{scale_suffix}'
        zero_name = f'{src.weight}.zero_point{scale_suffix}'
        if not scale_suffix and k:  # per tensor: one scale per weight
            new_inits.append(codes_t)
        else:
            new_inits += [
                codes_t, numpy_helper.from_array(src.scale, scale_name),
                _int_tensor(zero_name, np.zeros(src.scale.shape, np.int8),
                            dtype)]
        kwargs = {} if src.axis is None else dict(axis=src.axis)
        new_nodes.append(helper.make_node(
            'DequantizeLinear', [codes_t.name, scale_name, zero_name],
            [name], name=f'{src.weight}.DequantizeLinear{suffix}', **kwargs))
    kept = shape_nodes + [n for i, n in enumerate(graph.node)
                          if i not in removed]
    used = {i for n in new_nodes + kept for i in n.input} | outputs
    kept = [n for n in kept if n.op_type != 'Constant'
            or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(new_nodes + kept)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if _opset(proto) != opset:
        proto = onnx.version_converter.convert_version(proto, opset)
    if bits:
        helper.set_model_props(proto, {BITS_KEY: json.dumps(dict(bits))})
    return proto


def _int_tensor(name: str, values: np.ndarray,
                dtype: int) -> onnx.TensorProto:
    """An INT8 or INT4 initializer (INT4: raw data, see :func:`pack_int4`).
    """
    if dtype == TensorProto.INT8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape),
                              pack_int4(values).tobytes(), raw=True)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit values packed as ONNX stores INT4: two a byte, the first
    in the low nibble (what ``onnx.helper.pack_float32_to_4bit`` does, one
    element at a time; this is vectorised).

    Args:
        values (np.ndarray): Integers in ``[-8, 7]``, any shape.

    Returns:
        np.ndarray: uint8, ``ceil(numel / 2)`` bytes.
    """
    nibbles = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def onnx_weight_summary(proto: onnx.ModelProto) -> Dict[str, Any]:
    """Initializers by type: how many and how many bytes.

    Args:
        proto (onnx.ModelProto): A model.

    Returns:
        dict: ``initializers`` (type name → ``{'count', 'elements',
        'bytes'}``), ``dequantize_nodes`` and ``weight_bits`` (from the
        model's metadata; empty for a float export).
    """
    by_type: Dict[str, Dict[str, int]] = {}
    for t in proto.graph.initializer:
        kind = TensorProto.DataType.Name(t.data_type)
        entry = by_type.setdefault(kind, dict(count=0, elements=0, bytes=0))
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        entry['count'] += 1
        entry['elements'] += numel
        entry['bytes'] += len(t.raw_data) if t.raw_data else \
            numel * max(1, onnx.helper.tensor_dtype_to_np_dtype(
                t.data_type).itemsize)
    meta = {p.key: p.value for p in proto.metadata_props}
    return dict(initializers=by_type,
                dequantize_nodes=sum(n.op_type == 'DequantizeLinear'
                                     for n in proto.graph.node),
                weight_bits=json.loads(meta.get(BITS_KEY, '{}')))

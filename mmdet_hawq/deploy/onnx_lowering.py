"""Lowering an exported graph's quantized weights to integers, with the
``onnx`` package's own APIs (the second step of
:func:`~.onnx_export.export_onnx`).

The exporter leaves every quantized weight as an int8 initializer behind a
``DequantizeLinear``, sometimes with data-movement ops (the q/k/v ``Slice``
and ``Transpose`` of an attention's packed projection) between it and its
consumer. :func:`lower_quantized_weights` applies those ops to the integer
codes, re-stores the 4-bit codes as ``INT4`` (:func:`pack_int4`), gives
every codes initializer a zero point of its type, and converts the model to
opset 21; :func:`onnx_weight_summary` counts what the graph holds.
"""
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


#: Opset of the written model: ``DequantizeLinear`` takes INT4 from 21 on
#: (ONNX Runtime 1.20 runs up to 21).
ONNX_OPSET = 21
#: ``metadata_props`` key holding the JSON map weight name → bits.
BITS_KEY = 'mmdet_hawq.weight_bits'


def opset_of(proto: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
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
        if node.op_type == 'Identity':
            # torch's exporter writes an initializer equal to another one
            # (e.g. all-zero codes of zero-initialised layers) as an
            # Identity of the first: any size
            return self.get(node.input[0], depth + 1)
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
                            opset: int = ONNX_OPSET,
                            int8_codes: bool = False) -> onnx.ModelProto:
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
        int8_codes (bool): Store codes of at most 4 bits as ``INT8`` too:
            ONNX Runtime's integer kernels (``QLinearConv``,
            ``MatMulIntegerToFloat``) take no ``INT4``. Defaults to False.

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
    activation_codes = {n.output[0] for n in graph.node
                        if n.op_type == 'QuantizeLinear'}
    for index, node in enumerate(graph.node):
        if node.op_type != 'DequantizeLinear' or \
                node.input[0] in activation_codes:  # an activation's QDQ
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
        dtype = TensorProto.INT4 if bits[src.weight] <= 4 and \
            not int8_codes else TensorProto.INT8
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
    if opset_of(proto) != opset:
        proto = onnx.version_converter.convert_version(proto, opset)
    if bits:
        set_weight_bits(proto, bits)
    return proto


def set_weight_bits(proto: onnx.ModelProto, bits: Mapping[str, int]) -> None:
    """Record weight → bits in the model's ``metadata_props``
    (:data:`BITS_KEY`; :func:`onnx_weight_summary` reads it back)."""
    kept = [p for p in proto.metadata_props if p.key != BITS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = BITS_KEY, json.dumps(dict(bits))


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

"""The integer-kernel layout of an exported graph with 8-bit activations
(the third step of :func:`~.onnx_export.export_onnx`).

ONNX Runtime replaces a ``Conv`` by its integer kernel ``QLinearConv`` only
when the ``Conv``'s input, weight and bias each come from a
``DequantizeLinear`` (the bias as INT32 at scale ``s_x·s_w``) and its output
goes to a ``QuantizeLinear``. The exporter writes the input and output
pairs (the activation sites, :mod:`~mmdet_hawq.quant.activations`) and the
weight's; two things are left to do here, both exact or to within one INT32
step of the bias:

* :func:`fold_batch_norms`: a ``BatchNormalization`` in eval form after a
  ``Conv`` with integer weights becomes the weight's per-output-channel
  scale ``s·γ/√(σ²+ε)`` (the codes do not change) and the ``Conv``'s bias
  ``(b − μ)·γ/√(σ²+ε) + β``;
* :func:`quantize_conv_biases`: the float bias of a ``Conv`` whose input and
  weight are dequantized becomes INT32 codes ``round(b / (s_x·s_w))`` behind
  a ``DequantizeLinear``.

Linear layers need neither: ONNX Runtime fuses a ``MatMul`` with
dequantized inputs into ``MatMulIntegerToFloat`` (float output).
:func:`matmul_nbits` instead gives the ``MatMul`` of a weight of at most 4
bits ONNX Runtime's 4-bit kernel ``MatMulNBits`` (com.microsoft), the
weight stored as packed 4-bit codes, exactly. :func:`integer_kernels`
counts the integer kernels of an optimised graph.
"""
import collections
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_lowering import _Constants, _int_tensor

__all__ = ['INTEGER_KERNELS', 'concat_before_transpose', 'fold_batch_norms',
           'fold_constant_branches', 'fold_static_shapes',
           'integer_kernels', 'integer_layout', 'matmul_nbits',
           'quantize_conv_biases']

#: ONNX Runtime's integer (or integer-input) CPU kernels of a QDQ graph.
INTEGER_KERNELS = ('QLinearConv', 'MatMulIntegerToFloat', 'QLinearMatMul',
                   'MatMulInteger', 'ConvInteger', 'QGemm', 'QLinearAdd',
                   'DynamicQuantizeMatMul', 'MatMulNBits')


class _Graph:
    """Producers, consumers and initializers of a graph being rewritten."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.consts = _Constants(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = \
            collections.defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)

    def value(self, name: str) -> Optional[np.ndarray]:
        return self.consts.get(name)

    def dequantize(self, name: str) -> Optional[onnx.NodeProto]:
        """The ``DequantizeLinear`` producing ``name``, if any."""
        node = self.producer.get(name)
        return node if node is not None and \
            node.op_type == 'DequantizeLinear' else None

    def tensor(self, name: str) -> Optional[onnx.TensorProto]:
        """The initializer ``name`` is, following ``Identity`` nodes (torch's
        exporter writes an initializer equal to an earlier one, e.g. two
        zero-initialised biases, as an ``Identity`` of it)."""
        for _ in range(16):
            if name in self.inits:
                return self.inits[name]
            node = self.producer.get(name)
            if node is None or node.op_type != 'Identity':
                return None
            name = node.input[0]
        return None

    def add(self, tensor: onnx.TensorProto) -> str:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_dequantize(g: _Graph, conv: onnx.NodeProto
                       ) -> Optional[onnx.NodeProto]:
    """The ``DequantizeLinear`` of a ``Conv``'s integer weight, when it
    feeds that ``Conv`` only and its codes and scale are constant."""
    dq = g.dequantize(conv.input[1])
    if dq is None or len(g.consumers[dq.output[0]]) != 1 or \
            g.tensor(dq.input[0]) is None or g.value(dq.input[1]) is None:
        return None
    return dq


def fold_batch_norms(proto: onnx.ModelProto) -> int:
    """Fold each eval ``BatchNormalization`` that is the only consumer of a
    ``Conv`` with a dequantized weight into that weight's scale (per output
    channel, ``axis=0``) and the ``Conv``'s bias; in place.

    Returns:
        int: How many were folded.
    """
    g = _Graph(proto.graph)
    folded = []
    for bn in list(proto.graph.node):
        if bn.op_type != 'BatchNormalization' or len(bn.output) != 1:
            continue
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != 'Conv' or \
                len(g.consumers[bn.input[0]]) != 1:
            continue
        dq = _weight_dequantize(g, conv)
        params = [g.value(i) for i in bn.input[1:5]]
        if dq is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + _attr(bn, 'epsilon', 1e-5))
        scale = g.value(dq.input[1]).astype(np.float64)
        if scale.ndim == 1 and _attr(dq, 'axis', 1) != 0:
            continue  # a per-channel scale along another axis
        codes_t = g.tensor(dq.input[0])
        # a negative (or zero) γ goes into the codes, so every scale stays
        # positive, as integer kernels and the INT32 bias need
        codes = numpy_helper.to_array(codes_t).astype(np.int32)
        sign = np.where(k < 0, -1, np.where(k > 0, 1, 0)).reshape(
            (-1, ) + (1, ) * (codes.ndim - 1))
        full = np.broadcast_to(scale, k.shape)
        new_scale = np.where(k != 0, full * np.abs(k), full).astype(
            np.float32)
        name = conv.name or conv.output[0]
        dq.input[0] = g.add(_int_tensor(f'{name}.bn_folded_codes',
                                        codes * sign, codes_t.data_type))
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and \
            conv.input[2] else np.zeros_like(k)
        new_bias = ((bias - mean) * k + beta).astype(np.float32)
        dq.input[1] = g.add(numpy_helper.from_array(
            new_scale, f'{name}.bn_folded_scale'))
        zero = np.zeros(k.shape, np.int8)
        dq.input[2] = g.add(_int_tensor(f'{name}.bn_folded_zero_point', zero,
                                        codes_t.data_type))
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute('axis', 0))
        bias_name = g.add(numpy_helper.from_array(new_bias,
                                                  f'{name}.bn_folded_bias'))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        proto.graph.node.remove(bn)
    _drop_unused(proto.graph)
    return len(folded)


def quantize_conv_biases(proto: onnx.ModelProto) -> int:
    """Store the float bias of each ``Conv`` whose input and weight are
    dequantized as INT32 codes at scale ``s_x·s_w`` (per output channel)
    behind a ``DequantizeLinear``: the bias ``QLinearConv`` takes; in place.

    Returns:
        int: How many biases were quantized.
    """
    g = _Graph(proto.graph)
    new_nodes, count = [], 0
    for conv in proto.graph.node:
        if conv.op_type != 'Conv' or len(conv.input) < 3 or \
                g.tensor(conv.input[2]) is None:
            continue
        x_dq, w_dq = g.dequantize(conv.input[0]), g.dequantize(conv.input[1])
        if x_dq is None or w_dq is None:
            continue
        s_x, s_w = g.value(x_dq.input[1]), g.value(w_dq.input[1])
        if s_x is None or s_w is None or np.size(s_x) != 1:
            continue
        bias = numpy_helper.to_array(g.tensor(conv.input[2])).astype(
            np.float64)
        scale = (float(s_x) * np.broadcast_to(
            s_w.astype(np.float64), bias.shape)).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)
        codes = np.clip(np.round(bias / safe), -2**31, 2**31 - 1)
        name = f'{conv.name or conv.output[0]}.bias'
        g.add(numpy_helper.from_array(codes.astype(np.int32),
                                      f'{name}.codes'))
        g.add(numpy_helper.from_array(scale, f'{name}.scale'))
        g.add(numpy_helper.from_array(np.zeros(bias.shape, np.int32),
                                      f'{name}.zero_point'))
        new_nodes.append(helper.make_node(
            'DequantizeLinear',
            [f'{name}.codes', f'{name}.scale', f'{name}.zero_point'],
            [f'{name}.dequantized'], name=f'{name}.DequantizeLinear',
            axis=0))
        conv.input[2] = f'{name}.dequantized'
        count += 1
    nodes = new_nodes + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused(proto.graph)
    return count


#: Nodes that store or lay out a constant: a branch of only these is kept
#: (an integer weight behind its ``DequantizeLinear``, maybe transposed).
STORAGE_OPS = ('Constant', 'DequantizeLinear', 'Transpose', 'Reshape',
               'Identity', 'Unsqueeze', 'Squeeze', 'Flatten')


def fold_static_shapes(proto: onnx.ModelProto) -> int:
    """Replace each ``Shape`` node whose input's shape is fully known
    (ONNX's shape inference; the export has a fixed input size) by its
    value, an INT64 initializer; in place. The shape arithmetic behind it
    then no longer depends on the image, and
    :func:`fold_constant_branches` computes it at export.

    torch's exporter writes the sizes ``nn.MultiheadAttention`` reshapes
    by as ``Shape`` of its (dequantized) inputs. OpenVINO's low-precision
    transformations fail on a ``Shape`` of a dequantized activation
    (OpenVINO 2026.4: ``m_element_type.is_static()``).

    Returns:
        int: How many ``Shape`` nodes were replaced.
    """
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    dims = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        shape = v.type.tensor_type.shape
        if v.type.tensor_type.HasField('shape') and all(
                d.HasField('dim_value') for d in shape.dim):
            dims[v.name] = [d.dim_value for d in shape.dim]
    g = _Graph(proto.graph)
    count = 0
    for node in list(proto.graph.node):
        if node.op_type != 'Shape' or node.input[0] not in dims:
            continue
        full = dims[node.input[0]]
        start = int(_attr(node, 'start', 0))
        end = int(_attr(node, 'end', len(full)))
        proto.graph.node.remove(node)
        g.add(numpy_helper.from_array(
            np.array(full[start:end], np.int64), node.output[0]))
        count += 1
    _drop_dead(proto.graph)
    return count


def fold_constant_branches(proto: onnx.ModelProto) -> int:
    """Compute once, at export, every branch of the graph that does not
    depend on the image, and store its result as a float initializer; in
    place.

    Such branches are DETR's first decoder queries (zeros plus a learned
    embedding, through the first self-attention with its quantized weights)
    and the positional encodings of a fixed-size input. torch's exporter
    folds them in a float model, but not through the ``DequantizeLinear``
    of an integer weight, so a quantized export computed them at every
    inference. A branch that only stores or lays out a weight
    (:data:`STORAGE_OPS`) is kept, so integer weights stay integers. The
    values are those of the graph's own nodes (ONNX Runtime with its graph
    optimisations off). OpenVINO needs this: with such a branch left in
    the graph, its CPU plugin either fails to compile the model
    (``m_element_type.is_static()``, when a quantize pair sits on the
    branch) or computes wrong outputs for all but the first image
    (OpenVINO 2026.4; ``tests/test_deploy/test_onnx_export.py::
    test_w8a8_runs_on_openvino_integer_kernels``).

    Returns:
        int: How many tensors became initializers.
    """
    import onnxruntime as ort
    graph = proto.graph
    varying = {i.name for i in graph.input}
    for node in graph.node:  # topological order
        if any(i in varying for i in node.input if i):
            varying.update(node.output)
    g = _Graph(graph)
    frontier = []
    for node in graph.node:
        if not any(o in varying for o in node.output):
            continue
        for name in node.input:
            if name and name not in varying and name in g.producer and \
                    name not in frontier and \
                    not _stores_only(g, name):
                frontier.append(name)
    if not frontier:
        return 0
    needed, branch = set(frontier), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            branch.append(node)
            needed.update(i for i in node.input if i)
    types = {v.name: v.type.tensor_type.elem_type for v in
             onnx.shape_inference.infer_shapes(proto).graph.value_info}
    sub = helper.make_graph(
        list(reversed(branch)), 'constant_branches', [],
        [helper.make_tensor_value_info(
            name, types.get(name, onnx.TensorProto.FLOAT), None)
         for name in frontier],
        [t for t in graph.initializer if t.name in needed])
    options = ort.SessionOptions()
    options.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = ort.InferenceSession(
        helper.make_model(sub, opset_imports=proto.opset_import,
                          ir_version=proto.ir_version).SerializeToString(),
        options, providers=['CPUExecutionProvider']).run(None, {})
    for name, value in zip(frontier, values):
        graph.node.remove(g.producer[name])
        g.add(numpy_helper.from_array(np.asarray(value), name))
    _drop_dead(graph)
    return len(frontier)


def concat_before_transpose(proto: onnx.ModelProto) -> int:
    """Rewrite each ``Concat`` of ``Transpose`` nodes with one permutation
    (each read by that ``Concat`` alone) as the ``Transpose`` of the
    ``Concat`` of their inputs, along the permuted axis; in place. Exact.

    The multi-scale detectors flatten each level's feature map, transpose
    it to (B, HW, C) and concatenate the levels before the encoder's value
    projection. OpenVINO's low-precision transformations fail on that
    pattern when the concatenation is quantized (OpenVINO 2026.4:
    ``compile_model`` stops at ``m_element_type.is_static()``, or at a
    broadcast of the dequantization scale); with the ``Transpose`` after
    the ``Concat`` they do not.

    Returns:
        int: How many ``Concat`` nodes were rewritten.
    """
    g = _Graph(proto.graph)
    count = 0
    for concat in list(proto.graph.node):
        if concat.op_type != 'Concat' or len(concat.input) < 2:
            continue
        parts = [g.producer.get(i) for i in concat.input]
        if any(p is None or p.op_type != 'Transpose' or
               len(g.consumers[p.output[0]]) != 1 for p in parts):
            continue
        perms = {tuple(helper.get_attribute_value(a)) for p in parts
                 for a in p.attribute if a.name == 'perm'}
        if len(perms) != 1 or any(len(p.attribute) != 1 for p in parts):
            continue
        perm = perms.pop()
        axis = int(_attr(concat, 'axis', 0)) % len(perm)
        name = concat.name or concat.output[0]
        joined = f'{name}.before_transpose'
        index = list(proto.graph.node).index(concat)
        proto.graph.node.insert(index + 1, helper.make_node(
            'Transpose', [joined], [concat.output[0]],
            name=f'{name}.transpose', perm=list(perm)))
        concat.output[0] = joined
        del concat.input[:]
        concat.input.extend(p.input[0] for p in parts)
        for a in concat.attribute:
            if a.name == 'axis':
                a.i = perm[axis]
        for p in parts:
            proto.graph.node.remove(p)
        count += 1
    return count


def _stores_only(g: _Graph, name: str) -> bool:
    """Whether the constant ``name`` comes from initializers through
    :data:`STORAGE_OPS` alone."""
    todo = [name]
    while todo:
        node = g.producer.get(todo.pop())
        if node is None:
            continue
        if node.op_type not in STORAGE_OPS:
            return False
        todo.extend(i for i in node.input if i)
    return True


def integer_layout(proto: onnx.ModelProto) -> Dict[str, int]:
    """:func:`fold_batch_norms` then :func:`quantize_conv_biases`.

    Returns:
        dict: ``folded_batch_norms`` and ``int32_biases`` counts.
    """
    return dict(folded_batch_norms=fold_batch_norms(proto),
                int32_biases=quantize_conv_biases(proto))


#: ``MatMulNBits``' block along K (its scales are per block; ours are per
#: tensor, so every block gets the same scale).
NBITS_BLOCK = 32


def matmul_nbits(proto: onnx.ModelProto, accuracy_level: int = 4) -> int:
    """Each ``MatMul`` whose weight is a ``DequantizeLinear`` of 2-D codes
    in ``[-8, 7]`` with a per-tensor scale becomes ``MatMulNBits``: the
    codes ``c`` (K, N) stored transposed as unsigned nibbles ``c + 8`` (its
    default zero point 8), two a byte, in blocks of :data:`NBITS_BLOCK`
    along K (zero-padded), every block's scale the weight's; in place.

    Args:
        proto (onnx.ModelProto): An exported model.
        accuracy_level (int): ``MatMulNBits``' compute type: 4 quantizes
            the input to int8 per block at run time (integer dot products),
            0 dequantizes the weight to float. Defaults to 4.

    Returns:
        int: How many ``MatMul`` were replaced.
    """
    g = _Graph(proto.graph)
    count = 0
    for index, node in enumerate(list(proto.graph.node)):
        dq = g.dequantize(node.input[1]) if node.op_type == 'MatMul' \
            else None
        scale = None if dq is None else g.value(dq.input[1])
        codes_t = None if scale is None else g.tensor(dq.input[0])
        if codes_t is None or np.size(scale) != 1:
            continue
        codes = numpy_helper.to_array(codes_t).astype(np.int32)
        if codes.ndim != 2 or codes.min() < -8 or codes.max() > 7:
            continue
        k, n = codes.shape
        blocks = -(-k // NBITS_BLOCK)
        padded = np.zeros((n, blocks * NBITS_BLOCK), np.int32)
        padded[:, :k] = codes.T
        nibbles = (padded + 8).astype(np.uint8).reshape(n, blocks,
                                                        NBITS_BLOCK)
        name = f'{node.name or node.output[0]}.nbits'
        g.add(numpy_helper.from_array(
            nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), f'{name}.codes'))
        g.add(numpy_helper.from_array(
            np.full(n * blocks, float(scale), np.float32), f'{name}.scales'))
        fused = helper.make_node(
            'MatMulNBits', [node.input[0], f'{name}.codes',
                            f'{name}.scales'], list(node.output),
            name=name, domain='com.microsoft', K=k, N=n, bits=4,
            block_size=NBITS_BLOCK, accuracy_level=accuracy_level)
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, fused)
        count += 1
    if count:
        used = {i for n in proto.graph.node for i in n.input}
        dead = [n for n in proto.graph.node
                if n.op_type == 'DequantizeLinear' and n.output[0] not in
                used]
        for n in dead:
            proto.graph.node.remove(n)
        _drop_unused(proto.graph)
        if not any(o.domain == 'com.microsoft' for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid('com.microsoft',
                                                          1))
    return count


def integer_kernels(proto: onnx.ModelProto) -> Dict[str, int]:
    """Count of each :data:`INTEGER_KERNELS` op (and of the float ``Conv``,
    ``MatMul`` and ``Gemm`` left) in a graph, e.g. the optimised graph ONNX
    Runtime wrote (``SessionOptions.optimized_model_filepath``)."""
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {op: ops[op] for op in INTEGER_KERNELS + ('Conv', 'FusedConv',
                                                     'MatMul', 'Gemm',
                                                     'FusedMatMul')
            if ops[op]}


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove the nodes whose outputs nothing reads, then the initializers
    no node reads."""
    used = {o.name for o in graph.output}
    dead = []
    for node in reversed(graph.node):
        if any(o in used for o in node.output):
            used.update(node.input)
        else:
            dead.append(node)
    for node in dead:
        graph.node.remove(node)
    _drop_unused(graph)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads."""
    used = {i for n in graph.node for i in n.input} | \
        {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)

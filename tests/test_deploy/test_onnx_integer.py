"""The integer-kernel layout (mmdet_hawq/deploy/onnx_integer.py): BN folding
is exact (negative and zero γ included), the INT32 bias is within one bias
step, and ONNX Runtime then runs the convolution as ``QLinearConv``."""
import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmdet_hawq.deploy.onnx_integer import (fold_batch_norms,
                                            integer_kernels,
                                            quantize_conv_biases)

ort = pytest.importorskip('onnxruntime')

C_IN, C_OUT = 3, 4
X_SCALE, X_ZERO = 0.05, 10  # uint8 activation range [-0.5, 12.25]
Y_SCALE, Y_ZERO = 0.2, 128


def conv_bn_graph(gamma: np.ndarray, output_q: bool) -> onnx.ModelProto:
    """x → Q/DQ → Conv(DQ(int8 codes, per-tensor scale)) → BN [→ Q/DQ]."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (C_OUT, C_IN, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(codes, 'w.codes'),
        numpy_helper.from_array(np.array(0.01, np.float32), 'w.scale'),
        numpy_helper.from_array(np.array(0, np.int8), 'w.zero'),
        numpy_helper.from_array(np.array(X_SCALE, np.float32), 'x.scale'),
        numpy_helper.from_array(np.array(X_ZERO, np.uint8), 'x.zero'),
        numpy_helper.from_array(np.array(Y_SCALE, np.float32), 'y.scale'),
        numpy_helper.from_array(np.array(Y_ZERO, np.uint8), 'y.zero'),
        numpy_helper.from_array(gamma.astype(np.float32), 'bn.gamma'),
        numpy_helper.from_array(rng.normal(size=C_OUT).astype(np.float32),
                                'bn.beta'),
        numpy_helper.from_array(rng.normal(size=C_OUT).astype(np.float32),
                                'bn.mean'),
        numpy_helper.from_array(rng.uniform(0.5, 2, C_OUT).astype(
            np.float32), 'bn.var'),
    ]
    nodes = [
        helper.make_node('QuantizeLinear', ['x', 'x.scale', 'x.zero'],
                         ['xq']),
        helper.make_node('DequantizeLinear', ['xq', 'x.scale', 'x.zero'],
                         ['xd']),
        helper.make_node('DequantizeLinear', ['w.codes', 'w.scale',
                                              'w.zero'], ['w']),
        helper.make_node('Conv', ['xd', 'w'], ['c'], name='conv',
                         pads=[1, 1, 1, 1]),
        helper.make_node('BatchNormalization', ['c', 'bn.gamma', 'bn.beta',
                                                'bn.mean', 'bn.var'],
                         ['b' if output_q else 'y'], epsilon=1e-5),
    ]
    if output_q:
        nodes += [
            helper.make_node('QuantizeLinear', ['b', 'y.scale', 'y.zero'],
                             ['bq']),
            helper.make_node('DequantizeLinear', ['bq', 'y.scale',
                                                  'y.zero'], ['y'])]
    graph = helper.make_graph(
        nodes, 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                       [1, C_IN, 8, 8])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT,
                                       [1, C_OUT, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid('', 21)])
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, x: np.ndarray, level: str = 'disable',
        optimized: str = None) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = dict(
        disable=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        all=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[level]
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    return session.run(None, {'x': x})[0]


X = np.random.default_rng(1).uniform(-0.5, 12, (1, C_IN, 8, 8)).astype(
    np.float32)


def test_fold_batch_norms_is_exact_with_negative_and_zero_gamma():
    gamma = np.array([1.5, -0.7, 0.0, 0.3])
    model = conv_bn_graph(gamma, output_q=False)
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert 'BatchNormalization' not in [n.op_type for n in folded.graph.node]
    np.testing.assert_allclose(run(folded, X), run(model, X), rtol=1e-5,
                               atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t)
             for t in folded.graph.initializer}
    scale = inits['conv.bn_folded_scale']
    codes = inits['conv.bn_folded_codes']
    original = numpy_helper.to_array(model.graph.initializer[0])
    assert 'bn.gamma' not in inits  # the BN's parameters went with it
    assert (scale > 0).all()
    np.testing.assert_array_equal(codes[0], original[0])
    np.testing.assert_array_equal(codes[1], -original[1])
    assert not codes[2].any()


def test_int32_bias_and_qlinearconv(tmp_path):
    model = conv_bn_graph(np.array([1.5, -0.7, 0.2, 0.3]), output_q=True)
    reference = run(model, X)
    assert fold_batch_norms(model) == 1
    folded = {t.name: numpy_helper.to_array(t)
              for t in model.graph.initializer}
    assert quantize_conv_biases(model) == 1
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t)
             for t in model.graph.initializer}
    bias_codes = inits['conv.bias.codes']
    bias_scale = inits['conv.bias.scale']
    assert bias_codes.dtype == np.int32
    np.testing.assert_allclose(
        bias_scale, X_SCALE * folded['conv.bn_folded_scale'], rtol=1e-6)
    np.testing.assert_allclose(bias_codes * bias_scale,
                               folded['conv.bn_folded_bias'], rtol=0,
                               atol=0.5 * bias_scale.max() + 1e-7)
    # the float graph after both passes: outputs one Y_SCALE step at most
    # from the unfolded one (a bias step can move a rounding boundary)
    assert np.abs(run(model, X) - reference).max() <= Y_SCALE + 1e-6
    optimized = str(tmp_path / 'optimized.onnx')
    fused = run(model, X, 'all', optimized)
    kernels = integer_kernels(onnx.load(optimized))
    assert kernels.get('QLinearConv') == 1
    assert 'Conv' not in kernels
    assert np.abs(fused - reference).max() <= Y_SCALE + 1e-6


def test_without_dequantized_input_the_bias_stays_float():
    model = conv_bn_graph(np.ones(C_OUT), output_q=False)
    fold_batch_norms(model)
    conv = next(n for n in model.graph.node if n.op_type == 'Conv')
    conv.input[0] = 'x'  # a float input: no integer kernel to feed
    assert quantize_conv_biases(model) == 0


@pytest.mark.parametrize('k', [64, 40])  # 40: a zero-padded last block
def test_matmul_nbits_stores_the_codes_exactly(k):
    """``MatMulNBits`` at accuracy level 0 (the weight dequantized to float)
    gives the ``MatMul`` of the dequantized codes: the packing (transposed,
    nibbles ``c + 8``, blocks along K) is exact; level 4 (int8 dot
    products) stays close."""
    from mmdet_hawq.deploy.onnx_integer import matmul_nbits
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, (k, 24)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node('DequantizeLinear', ['w.codes', 'w.scale'], ['w']),
         helper.make_node('MatMul', ['x', 'w'], ['y'], name='mm')], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [5, k])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [5, 24])],
        [numpy_helper.from_array(codes, 'w.codes'),
         numpy_helper.from_array(np.array(0.03, np.float32), 'w.scale')])
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid('', 21)])
    model.ir_version = 10
    x = rng.normal(size=(5, k)).astype(np.float32)
    want = x @ (codes.astype(np.float32) * np.float32(0.03))
    for level, tol in ((0, 1e-5), (4, 0.05)):
        nbits = copy.deepcopy(model)
        assert matmul_nbits(nbits, accuracy_level=level) == 1
        ops = [n.op_type for n in nbits.graph.node]
        assert ops == ['MatMulNBits']  # the weight's DequantizeLinear gone
        session = ort.InferenceSession(nbits.SerializeToString(),
                                       providers=['CPUExecutionProvider'])
        got = session.run(None, {'x': x})[0]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_a_bias_behind_an_identity_is_quantized_too():
    """torch's exporter writes an initializer equal to an earlier one (two
    zero-initialised biases) as an Identity of it: the INT32 bias follows
    the Identity, so the convolution still fuses."""
    model = conv_bn_graph(np.ones(C_OUT), output_q=True)
    fold_batch_norms(model)
    conv = next(n for n in model.graph.node if n.op_type == 'Conv')
    model.graph.node.insert(0, helper.make_node(
        'Identity', [conv.input[2]], ['bias.alias']))
    conv.input[2] = 'bias.alias'
    assert quantize_conv_biases(model) == 1
    onnx.checker.check_model(model, full_check=True)

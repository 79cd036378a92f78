"""mmdet_hawq.deploy.runtimes: one session interface over ONNX Runtime and
OpenVINO, and the export's folding of image-independent branches."""
import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmdet_hawq.deploy.onnx_integer import fold_constant_branches
from mmdet_hawq.deploy.runtimes import make_session, runtime_missing
from mmdet_hawq.errors import HawqUserError

HAVE_OPENVINO = importlib.util.find_spec('openvino') is not None
needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO,
    reason='openvino is the optional extra (pip install -e .[openvino])')


def branchy_model(path: str) -> np.ndarray:
    """x (1, 4, 8) → x @ W1 + C with an integer weight W1, where the
    constant C = quantize-dequantize(E @ W2) comes from an embedding E and a
    second integer weight W2 (an image-independent branch, like DETR's first
    decoder queries). Returns the weight codes of W1."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (8, 8)).astype(np.int8)
    w2 = rng.integers(-127, 128, (8, 8)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w1, 'w1'),
        numpy_helper.from_array(np.array(0.01, np.float32), 'w1_s'),
        numpy_helper.from_array(np.array(0, np.int8), 'w_z'),
        numpy_helper.from_array(w2, 'w2'),
        numpy_helper.from_array(np.array(0.02, np.float32), 'w2_s'),
        numpy_helper.from_array(rng.standard_normal((1, 4, 8)).astype(
            np.float32), 'e'),
        numpy_helper.from_array(np.array(0.05, np.float32), 'a_s'),
        numpy_helper.from_array(np.array(128, np.uint8), 'a_z'),
    ]
    nodes = [
        # explicit zero points, as the exporter writes them (ONNX Runtime
        # 1.20.1's basic optimisations fold the Transpose into the
        # initializer of a DequantizeLinear without one, and compute wrong)
        helper.make_node('DequantizeLinear', ['w1', 'w1_s', 'w_z'],
                         ['w1f']),
        helper.make_node('Transpose', ['w1f'], ['w1t'], perm=[1, 0]),
        helper.make_node('DequantizeLinear', ['w2', 'w2_s', 'w_z'],
                         ['w2f']),
        helper.make_node('MatMul', ['e', 'w2f'], ['c']),
        helper.make_node('QuantizeLinear', ['c', 'a_s', 'a_z'], ['cq']),
        helper.make_node('DequantizeLinear', ['cq', 'a_s', 'a_z'], ['cd']),
        helper.make_node('MatMul', ['x', 'w1t'], ['y0']),
        helper.make_node('Add', ['y0', 'cd'], ['y']),
    ]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                   [1, 4, 8])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4, 8])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[
        helper.make_opsetid('', 21)]), path)
    return w1


def test_fold_constant_branches_keeps_integer_weights(tmp_path):
    """The constant branch becomes one float initializer with the graph's
    own values; the weight read by the image's branch stays INT8 behind its
    DequantizeLinear (and its Transpose)."""
    src, dst = str(tmp_path / 'a.onnx'), str(tmp_path / 'b.onnx')
    w1 = branchy_model(src)
    proto = onnx.load(src)
    assert fold_constant_branches(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, dst)
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ['DequantizeLinear', 'Transpose', 'MatMul', 'Add']
    inits = {t.name: t for t in proto.graph.initializer}
    assert 'w2' not in inits and inits['cd'].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(inits['w1']), w1)
    x = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(
        np.float32)
    before = make_session(src).run(x)[0]
    after = make_session(dst).run(x)[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    assert fold_constant_branches(proto) == 0


def test_unknown_or_missing_runtime_is_one_line(tmp_path):
    with pytest.raises(HawqUserError, match="unknown runtime 'tvm'"):
        make_session(str(tmp_path / 'x.onnx'), 'tvm')
    with pytest.raises(HawqUserError, match='does not exist'):
        make_session(str(tmp_path / 'x.onnx'))
    assert runtime_missing('onnxruntime') is None
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'not a model')
    with pytest.raises(HawqUserError) as err:
        make_session(str(bad))
    assert 'ONNX Runtime cannot load' in str(err.value)
    assert '\n' not in str(err.value)


@needs_openvino
def test_openvino_matches_onnx_runtime_image_after_image(tmp_path):
    """The same file on both runtimes: the same outputs for several inputs
    in a row, and each says which precision its kernels execute in."""
    path = str(tmp_path / 'a.onnx')
    branchy_model(path)
    folded = onnx.load(path)
    fold_constant_branches(folded)
    onnx.save(folded, str(tmp_path / 'b.onnx'))
    ort_s, ov_s = make_session(path), make_session(path, 'openvino')
    assert ov_s.input_shape == ort_s.input_shape == (1, 4, 8)
    assert ov_s.output_names == ort_s.output_names == ['y']
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = rng.standard_normal((1, 4, 8)).astype(np.float32)
        np.testing.assert_allclose(ov_s.run(x)[0], ort_s.run(x)[0],
                                   rtol=1e-5, atol=1e-5)
    # a float input times an int8 weight computes in float on both (f32:
    # OpenVINO's precision hint here)
    for runtime in ('onnxruntime', 'openvino'):
        session = make_session(str(tmp_path / 'b.onnx'), runtime)
        assert session.kernel_precisions() == {'MatMul/f32': 1}
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'not a model')
    with pytest.raises(HawqUserError, match='OpenVINO cannot load'):
        make_session(str(bad), 'openvino')


@needs_openvino
def test_openvino_profile_counts_the_executed_layers(tmp_path):
    """The performance counters give every executed layer type's time."""
    path = str(tmp_path / 'a.onnx')
    branchy_model(path)
    session = make_session(path, 'openvino', perf_count=True)
    times = session.profile(np.zeros((1, 4, 8), np.float32))
    assert times and all(ms >= 0 for ms in times.values())
    assert any(k.startswith(('FullyConnected', 'MatMul')) for k in times)
    assert list(times.values()) == sorted(times.values(), reverse=True)

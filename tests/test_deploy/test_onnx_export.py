"""ONNX export with integer weights: the initializers are INT4/INT8 codes of
the quantizer's formula with their scales, and ONNX Runtime's outputs match
the fake-quantized PyTorch model.

Tolerance: the ONNX graph computes the same float32 network with other
kernels (and BN not folded into the integer convolutions), so outputs
differ in the last bits; we require max abs differences below 1e-4 for
scores (logits) and boxes (normalised), and measured about 1e-6 here.
"""
import collections
from typing import List

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mmdet_hawq.deploy import DetectorOnnxWrapper, export_onnx, pack_int4
from mmdet_hawq.deploy.onnx_runtime import (OnnxDetector,
                                            detections_from_outputs)
from mmdet_hawq.deploy.runtimes.onnxruntime_session import \
    dequantize_behaviour
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import plan_bits, quantizable_weights, uniform_plan

from ..conftest import TEST_CONFIGS, build_from
from .conftest import make_packed

ATOL = 1e-4
SHAPE = (128, 128)  # the tiny config resizes to 128x128


def fake_quantized(cfg, packed: dict) -> torch.nn.Module:
    from mmdet_hawq.deploy import load_packed
    from mmdet.registry import MODELS
    import copy
    return load_packed(MODELS.build(copy.deepcopy(cfg.model)), packed,
                       keep_packed=False)


def max_diffs(model, onnx_file, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *shape, generator=gen) * 255
    with torch.no_grad():
        ref = DetectorOnnxWrapper(model, shape)(image)
    out = OnnxDetector(onnx_file)(image.numpy())
    assert out[0].shape == tuple(ref[0].shape)
    # equal infinities (DDQ-DETR's suppressed queries) differ by 0
    return [float(np.abs(np.where(o == r, 0, o - r)).max())
            for o, r in zip(out, (r.numpy() for r in ref))]


def test_pack_int4_matches_onnx():
    values = np.array([-7, 7, 0, -1, 3, -8, 5])
    ours = pack_int4(values)
    assert np.array_equal(ours, helper.pack_float32_to_4bit(values, True))
    tensor = helper.make_tensor('t', TensorProto.INT4, [7], ours.tobytes(),
                                raw=True)
    assert np.array_equal(numpy_helper.to_array(tensor), values)


@pytest.fixture(scope='module')
def exported(tiny_cfg, tiny_packed, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('onnx') / 'mixed.onnx')
    model = fake_quantized(tiny_cfg, tiny_packed['packed'])
    report = export_onnx(model, out, SHAPE,
                         packed=tiny_packed['packed']['packed'])
    return model, out, report


def test_initializers_are_the_quantizer_codes(tiny_packed, exported):
    """Codes ``round(W / s)`` with ``s = max|W| / (2^(b-1) - 1)`` from the
    float weights (float32, as the quantizer computes), INT4 up to 4 bits,
    INT8 above; zero point 0; every DequantizeLinear feeds a compute op."""
    _, out, report = exported
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in
               ('', 'ai.onnx')) == 21
    inits = {t.name: t for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == 'DequantizeLinear']
    plan, float_state = tiny_packed['plan'], tiny_packed['float_state']
    # the output projection of DETR's first decoder self-attention reads
    # only the learned queries: computed at export, its output a constant
    folded = ['decoder.layers.0.self_attn.attn.out_proj.weight']
    assert report['folded_weights'] == folded
    quantized = {n: b for n, b in plan.items()
                 if b is not None and n not in folded}
    assert report['weight_bits'] == quantized
    by_weight = {}
    for node in dq:
        weight = node.input[0].rsplit('.codes', 1)[0]
        assert weight in quantized, node.input[0]
        assert node.input[1:] == [f'{weight}.scale', f'{weight}.zero_point']
        by_weight.setdefault(weight, []).append(node.input[0])
    assert sorted(by_weight) == sorted(quantized)
    stored = 0
    for name, bits in quantized.items():
        w = float_state[name].numpy().astype(np.float32)
        q = 2**(bits - 1) - 1
        scale = np.float32(np.abs(w).max()) / np.float32(q)
        codes = np.clip(np.round(w / scale), -q, q).astype(np.int8)
        arrays = []
        for codes_name in by_weight[name]:
            t = inits[codes_name]
            assert t.data_type == (TensorProto.INT4 if bits <= 4 else
                                   TensorProto.INT8), name
            arrays.append(numpy_helper.to_array(t))
        if len(arrays) == 1 and arrays[0].shape == w.shape:
            assert np.array_equal(arrays[0], codes), name
        else:  # q/k/v parts of an attention projection, sliced at export
            # (the part a constant branch reads is computed at export)
            got = collections.Counter(
                np.concatenate([a.ravel() for a in arrays]).tolist())
            assert not got - collections.Counter(codes.ravel().tolist())
            assert sum(a.size for a in arrays) * 3 >= 2 * codes.size
        stored += sum(a.size for a in arrays)
        s = numpy_helper.to_array(inits[f'{name}.scale'])
        assert s.shape == () and s.dtype == np.float32 and s == scale
        zp = inits[f'{name}.zero_point']
        assert zp.data_type == inits[by_weight[name][0]].data_type
        assert not numpy_helper.to_array(zp).any()
    # the integer codes hold exactly the quantized weights; the float ones
    # (the plan's None, the head's final FFNs; renamed, transposed or
    # BN-folded by torch's exporter) stay FLOAT
    ints = sum(report['initializers'][k]['elements'] for k in ('INT4',
                                                               'INT8'))
    assert ints - sum(f.endswith('.zero_point') for f in inits) == stored
    float_numel = sum(float_state[n].numel() for n, b in plan.items()
                      if b is None and n not in folded) + float_state[
                          'bbox_head.fc_cls.weight'].numel()
    assert report['initializers']['FLOAT']['elements'] >= float_numel
    # each DequantizeLinear feeds a compute op, not a Slice/Transpose
    # that ONNX Runtime's QDQ propagation would re-quantize at run time
    outputs = {n.output[0] for n in dq}
    users = {n.op_type for n in proto.graph.node
             if any(i in outputs for i in n.input)}
    assert users <= {'Conv', 'Gemm', 'MatMul', 'Add'}, users


def test_onnx_runtime_matches_fake_quantized(exported):
    """Also the regression test of the ONNX Runtime bug worked around at
    export: with the q/k/v Slice/Transpose left after an INT4
    DequantizeLinear, onnxruntime 1.20.1's QDQ propagation corrupted this
    model's outputs (max abs diff 0.83) at its default optimisation level.
    """
    model, out, _ = exported
    scores, boxes = max_diffs(model, out)
    assert scores < ATOL and boxes < ATOL


def check_detections(model, onnx_file, cfg) -> List[np.ndarray]:
    """ONNX Runtime's outputs on the config's test images, through the
    family's post-processing, give the PyTorch model's own detections
    (mmdet's predict). Returns the ONNX scores of each image."""
    import copy

    from mmengine.runner import Runner
    onnx_model = OnnxDetector(onnx_file)
    batch = next(iter(Runner.build_dataloader(
        copy.deepcopy(cfg.test_dataloader))))
    all_scores = []
    for image, sample in zip(batch['inputs'], batch['data_samples']):
        ref_sample = copy.deepcopy(sample)
        scores, boxes = onnx_model(image.numpy())
        all_scores.append(scores)
        ours = detections_from_outputs(model, scores, boxes, [sample])[0]
        with torch.no_grad():
            data = model.data_preprocessor(
                dict(inputs=[image], data_samples=[ref_sample]), False)
            ref = model.predict(data['inputs'], data['data_samples'])[0]
        a, b = ours.pred_instances, ref.pred_instances
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
        assert torch.allclose(a.bboxes, b.bboxes, atol=1e-3)
    return all_scores


def test_detections_through_mmdet_post_processing(exported, tiny_cfg):
    """ONNX Runtime's outputs through predict_by_feat give the PyTorch
    model's own detections (mmdet's predict)."""
    model, out, _ = exported
    check_detections(model, out, tiny_cfg)


def test_per_channel_and_last_layer_only(tiny_cfg, tmp_path):
    made = make_packed(tiny_cfg, axis=0)
    model = fake_quantized(tiny_cfg, made['packed'])
    out = str(tmp_path / 'per_channel.onnx')
    export_onnx(model, out, SHAPE, packed=made['packed']['packed'],
                last_layer_only=True)
    proto = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t)
             for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == 'DequantizeLinear']
    assert nodes
    for node in nodes:  # the channel axis moves with a folded Transpose
        axis = [helper.get_attribute_value(a) for a in node.attribute
                if a.name == 'axis']
        codes, scale = inits[node.input[0]], inits[node.input[1]]
        assert axis and scale.shape == (codes.shape[axis[0]], )
    scores, boxes = OnnxDetector(out)(np.zeros((1, 3) + SHAPE, np.float32))
    assert scores.shape[0] == 1 and boxes.shape[0] == 1
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, *SHAPE, generator=gen) * 255
    with torch.no_grad():
        ref = DetectorOnnxWrapper(model, SHAPE, last_layer_only=True)(image)
    got = OnnxDetector(out)(image.numpy())
    assert np.abs(got[0] - ref[0].numpy()).max() < ATOL
    assert np.abs(got[1] - ref[1].numpy()).max() < ATOL


def test_float_export_has_no_integer_weights(tiny_cfg, tmp_path):
    model = build_from(tiny_cfg)
    out = str(tmp_path / 'fp32.onnx')
    report = export_onnx(model, out, SHAPE)
    assert set(report['initializers']) <= {'FLOAT', 'INT64'}
    assert report['dequantize_nodes'] == 0
    assert max(max_diffs(model, out)) < ATOL


def export_at_4_bits(cfg, tmp_path) -> tuple:
    """The config's model (``load_from``) quantized to 4 bits and exported:
    (fake-quantized model, ONNX file, export report)."""
    made = make_packed(cfg, plan_fn=lambda m: plan_bits(uniform_plan(
        quantizable_weights(m), 4)))
    model = fake_quantized(cfg, made['packed'])
    out = str(tmp_path / 'model.onnx')
    report = export_onnx(model, out, SHAPE, packed=made['packed']['packed'])
    return model, out, report


def test_dino_exports_through_grid_sample(family_cfg, tmp_path):
    """DINO's multi-scale deformable attention goes through mmcv's
    PyTorch path (GridSample) and matches the fake-quantized model."""
    cfg = family_cfg('dino')
    model, out, report = export_at_4_bits(cfg, tmp_path)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert 'GridSample' in ops
    # DINO's denoising label embedding is read in training only
    assert report['unused_weights'] == [
        'dn_query_generator.label_embedding.weight']
    # its content queries are a learned embedding: computed at export
    assert report['folded_weights'] == ['query_embedding.weight']
    assert len(report['weight_bits']) == len(quantizable_weights(model)) - 2
    scores, boxes = max_diffs(model, out)
    assert scores < ATOL and boxes < ATOL


def test_onnx_runtime_keeps_dequantize_unless_folding(exported):
    """By default ONNX Runtime keeps the integer weights and their
    DequantizeLinear nodes (run at every inference); with
    session.disable_quant_qdq=1 constant folding turns them into fp32."""
    rows = dequantize_behaviour(exported[1])
    for row in rows:
        if row['fold_dequantize']:
            assert row['dequantize_nodes'] == 0
            assert 'INT4' not in row['initializers']
        else:
            assert row['dequantize_nodes'] > 0
            assert row['initializers'].get('INT4', 0) > 0


class _Bessel(torch.nn.Module):
    """An op torch's TorchScript exporter has no ONNX form of."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)


def test_unsupported_operator_names_operator_and_layer(tiny_cfg, tmp_path):
    model = build_from(tiny_cfg)
    head = model.bbox_head
    head.fc_cls = torch.nn.Sequential(head.fc_cls, _Bessel())
    with pytest.raises(HawqUserError) as err:
        export_onnx(model, str(tmp_path / 'x.onnx'), (64, 64))
    message = str(err.value)
    assert 'operator aten::special_bessel_j0 has no ONNX export' in message
    assert 'used by bbox_head.fc_cls.1' in message
    assert '\n' not in message


@pytest.mark.parametrize('family', ['deformable_twostage', 'conditional',
                                    'dab'])
def test_every_family_member_exports(family_cfg, tmp_path, family):
    """Deformable DETR (two-stage, refine), Conditional and DAB-DETR export
    at 4 bits and match the fake-quantized model under ONNX Runtime."""
    cfg = family_cfg(family)
    model, out, report = export_at_4_bits(cfg, tmp_path)
    assert report['dequantize_nodes'] > 0
    assert report['initializers']['INT4']['count'] > 0
    assert not report['unused_weights']
    scores, boxes = max_diffs(model, out)
    assert scores < ATOL and boxes < ATOL


def test_ddq_detr_exports_its_distinct_query_selection(family_cfg, tmp_path):
    """DDQ-DETR's NMS in its query selection exports as ONNX
    NonMaxSuppression; the queries its decoder suppresses score -inf, and
    the detections from the outputs alone are mmdet's own."""
    from mmdet_hawq.models import detection_head
    cfg = family_cfg('ddq')
    # wide boxes and a low IoU threshold: the decoder's NMS suppresses
    # (down to one query of 4 classes: at most 4 detections)
    cfg.model.dqs_cfg = dict(type='nms', iou_threshold=0.05)
    cfg.model.test_cfg.max_per_img = 4
    model = build_from(cfg)
    with torch.no_grad():
        layers = detection_head(model).reg_branches[:cfg.model.decoder[
            'num_layers']]
        for branch in layers:
            branch[-1].bias[2:] = 6.0
    cfg.load_from = str(tmp_path / 'wide.pth')
    torch.save(dict(state_dict=model.state_dict()), cfg.load_from)
    model, out, report = export_at_4_bits(cfg, tmp_path)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {'NonMaxSuppression', 'GridSample'} <= ops
    assert report['unused_weights'] == [
        'dn_query_generator.label_embedding.weight']
    for seed in (1, 2):
        assert max(max_diffs(model, out, seed=seed)) < ATOL
    scores = check_detections(model, out, cfg)
    assert any(np.isinf(s[-1]).all(-1).any() for s in scores)


def test_ddq_detr_query_selection_without_onnx_form_is_one_line(
        family_cfg, tmp_path):
    cfg = family_cfg('ddq')
    cfg.model.dqs_cfg = dict(type='soft_nms', iou_threshold=0.8)
    with pytest.raises(HawqUserError) as err:
        export_onnx(build_from(cfg), str(tmp_path / 'x.onnx'), SHAPE)
    assert "dqs_cfg={'type': 'soft_nms', 'iou_threshold': 0.8} cannot be " \
        'exported to ONNX' in str(err.value)
    assert '\n' not in str(err.value)


@pytest.fixture(scope='module')
def w8a8_export(tiny_cfg, family_cfg, tmp_path_factory):
    """family → W8A8 of its shrunk member (quantized once per module): the
    reference model, the activation ranges, the packed weights, the ONNX
    file, the export's report and the quantized convolutions."""
    from mmdet_hawq import QuantSettings, quantize
    from mmdet_hawq.engine.calibration import calibration_set
    from mmdet_hawq.quant import pack_state_dict
    done = {}

    def get(family: str) -> dict:
        if family in done:
            return done[family]
        cfg = tiny_cfg if family == 'detr' else family_cfg(family)
        model = build_from(cfg)
        settings = QuantSettings(metric='uniform', bits=8,
                                 calibration=dict(num_images=4, batch_size=2),
                                 activations=dict(method='mse'))
        result = quantize(model, calibration_set(cfg, model,
                                                 settings.calibration),
                          settings)
        packed = pack_state_dict(model, result.quantized,
                                 result.plan)['packed']
        reference = build_from(cfg)
        reference.load_state_dict(model.state_dict())
        out = str(tmp_path_factory.mktemp(f'w8a8_{family}') / 'w8a8.onnx')
        report = export_onnx(reference, out, SHAPE, packed=packed,
                             activations=result.activations)
        convs = [n for n, m in reference.named_modules()
                 if isinstance(m, torch.nn.Conv2d)
                 and f'{n}.weight' in packed]
        done[family] = dict(reference=reference, result=result,
                            packed=packed, out=out, report=report,
                            convs=convs)
        return done[family]

    return get


@pytest.mark.parametrize('family', sorted(TEST_CONFIGS))
def test_w8a8_runs_on_integer_kernels_in_every_family(
        w8a8_export, tmp_path, family):
    """W8A8 on a shrunk member of every family: every site's tensor gets a
    uint8 QuantizeLinear / DequantizeLinear pair; after ONNX Runtime's
    optimizer every quantized convolution is a QLinearConv (its BatchNorm
    folded, its bias INT32) and the linear layers are integer MatMuls; and
    ONNX Runtime's outputs follow the fake-quantized PyTorch model (each
    quantizer can round a value one step apart, so the bound is loose, and
    counted per query)."""
    import onnxruntime as ort

    from mmdet_hawq.deploy.onnx_integer import integer_kernels
    from mmdet_hawq.quant.activations import quantized_activations, sites_of
    w = w8a8_export(family)
    reference, result, packed = w['reference'], w['result'], w['packed']
    out, report, convs = w['out'], w['report'], w['convs']
    outputs = [n for n in result.activations if n.endswith(':output')]
    assert len(outputs) == len(convs) > 0
    assert report['folded_batch_norms'] > 0
    graph = onnx.load(out).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in graph.node if n.op_type == 'Constant'}
    consts.update({t.name: numpy_helper.to_array(t)
                   for t in graph.initializer})
    quantize_nodes = [n for n in graph.node if n.op_type == 'QuantizeLinear']
    # one pair per site (the exporter merges sites that quantize the same
    # tensor to the same range, e.g. a self-attention's query and key)
    assert 0 < len(quantize_nodes) <= len(result.activations)
    scales = {np.float32(r.qparams()[0]) for r in result.activations.values()}
    assert all(np.float32(consts[n.input[1]]) in scales
               for n in quantize_nodes)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    ort.InferenceSession(out, options, providers=['CPUExecutionProvider'])
    kernels = integer_kernels(onnx.load(str(tmp_path / 'optimized.onnx')))
    assert kernels.get('QLinearConv') == len(convs)
    assert 'Conv' not in kernels and 'FusedConv' not in kernels
    assert kernels.get('MatMulIntegerToFloat', 0) >= 4
    image = torch.rand(1, 3, *SHAPE,
                       generator=torch.Generator().manual_seed(0)) * 255
    with quantized_activations(sites_of(reference, result.activations),
                               result.activations), torch.no_grad():
        want = DetectorOnnxWrapper(reference, SHAPE)(image)
    got = OnnxDetector(out)(image.numpy())
    # per query: a two-stage model's top-k can pick another of two near-
    # tied proposals (the tiny DINO does), which changes that query wholesale
    close = [(np.abs(g - w.numpy()).max(-1) <= tol)
             for g, w, tol in zip(got, want, (0.5, 0.05))]
    differ = int((~(close[0] & close[1])).any(axis=0).sum())  # queries
    assert differ <= 1, f'{differ} of {got[0].shape[2]} queries differ'
    if family == 'detr':  # all-8-bit weights need no opset-21 INT4
        old = str(tmp_path / 'w8a8_opset17.onnx')
        assert export_onnx(reference, old, SHAPE, packed=packed,
                           activations=result.activations,
                           opset=17)['opset'] == 17
        options.optimized_model_filepath = str(tmp_path / 'opt17.onnx')
        ort.InferenceSession(old, options, providers=['CPUExecutionProvider'])
        assert integer_kernels(onnx.load(str(tmp_path / 'opt17.onnx'))) == \
            kernels
        for a, b in zip(OnnxDetector(old)(image.numpy()), got):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('family', sorted(TEST_CONFIGS))
def test_w8a8_runs_on_openvino_integer_kernels(w8a8_export, family):
    """The same W8A8 export on OpenVINO: its compiled runtime model runs
    every quantized convolution and at least the four linear layers of
    ONNX Runtime's integer MatMuls in int8, and its outputs follow ONNX
    Runtime's on several images in a row (OpenVINO 2026.4 computed all but
    the first image wrong while an image-independent branch was left in the
    graph; each quantizer can round a value one step apart, so per query)."""
    pytest.importorskip('openvino', reason='openvino is the optional extra '
                        '(pip install -e .[openvino])')
    w = w8a8_export(family)
    ov_model = OnnxDetector(w['out'], runtime='openvino')
    ort_model = OnnxDetector(w['out'])
    kernels = ov_model.session.kernel_precisions()
    assert kernels.get('Convolution/int8') == len(w['convs']) > 0
    assert 'Convolution/f32' not in kernels
    assert kernels.get('MatMul/int8', 0) >= 4
    rng = np.random.default_rng(0)
    for _ in range(3):
        image = rng.uniform(0, 255, (1, 3) + SHAPE).astype(np.float32)
        got, want = ov_model(image), ort_model(image)
        close = [(np.abs(g - w_).max(-1) <= tol)
                 for g, w_, tol in zip(got, want, (0.5, 0.05))]
        differ = int((~(close[0] & close[1])).any(axis=0).sum())
        assert differ <= 1, f'{differ} of {got[0].shape[2]} queries differ'


def test_activations_without_an_integer_kernel_are_one_line(
        tiny_cfg, tmp_path):
    from mmdet_hawq.quant.activations import ActivationRange
    model = build_from(tiny_cfg)
    with pytest.raises(HawqUserError, match='activations at 4 bits have no '
                       'integer kernel in ONNX Runtime') as err:
        export_onnx(model, str(tmp_path / 'a4.onnx'), SHAPE,
                    activations={'backbone.conv1': ActivationRange(
                        -1.0, 1.0, 4)})
    assert '\n' not in str(err.value)
    with pytest.raises(HawqUserError, match="activation site 'neck.x' is "
                       'not a module of DETR'):
        export_onnx(model, str(tmp_path / 'a8.onnx'), SHAPE,
                    activations={'neck.x': ActivationRange(-1.0, 1.0, 8)})


def test_identical_codes_of_two_layers_lower():
    """torch's exporter writes an initializer equal to an earlier one as an
    Identity of it (zero-initialised layers, e.g. DINO-R50's sampling
    offsets, have equal codes, larger than the folded-constant limit): the
    lowering follows the Identity and stores both weights' codes."""
    from mmdet_hawq.deploy.onnx_lowering import lower_quantized_weights
    codes = np.zeros((80, 80), np.int8)  # 6400 elements
    nodes = [
        helper.make_node('Identity', ['a.codes'], ['b.codes']),
        helper.make_node('DequantizeLinear', ['a.codes', 's'], ['a']),
        helper.make_node('DequantizeLinear', ['b.codes', 's'], ['b']),
        helper.make_node('MatMul', ['x', 'a'], ['y1']),
        helper.make_node('MatMul', ['y1', 'b'], ['y'])]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                   [1, 80])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 80])],
        [numpy_helper.from_array(codes, 'a.codes'),
         numpy_helper.from_array(np.array(0.5, np.float32), 's')])
    proto = helper.make_model(graph, opset_imports=[
        helper.make_opsetid('', 20)])
    lowered = lower_quantized_weights(
        proto, {'a.codes': 'a.weight', 'b.codes': 'b.weight'},
        {'a.weight': 8, 'b.weight': 8})
    names = {t.name for t in lowered.graph.initializer}
    assert {'a.weight.codes', 'b.weight.codes'} <= names


def test_int4_weights_in_matmul_nbits(tiny_cfg, tmp_path):
    """``int4_matmul``: the 4-bit weights of the linear layers go to ONNX
    Runtime's MatMulNBits (packed 4-bit codes, int8 dot products), which
    ONNX Runtime runs close to the fake-quantized model (its activations
    are quantized per block at run time, so not to float precision)."""
    made = make_packed(tiny_cfg, plan_fn=lambda m: plan_bits(uniform_plan(
        quantizable_weights(m), 4)))
    model = fake_quantized(tiny_cfg, made['packed'])
    out = str(tmp_path / 'nbits.onnx')
    report = export_onnx(model, out, SHAPE, packed=made['packed']['packed'],
                         int4_matmul=True)
    nodes = onnx.load(out).graph.node
    dequantized = {n.output[0] for n in nodes
                   if n.op_type == 'DequantizeLinear'}
    assert report['matmul_nbits'] == sum(
        n.op_type == 'MatMulNBits' for n in nodes) >= 10
    # every linear weight is 4-bit here: no MatMul reads a weight's codes
    assert not [n for n in nodes
                if n.op_type == 'MatMul' and n.input[1] in dequantized]
    scores, boxes = max_diffs(model, out)
    assert scores < 0.5 and boxes < 0.05

"""benchmarks/benchmark_runtimes.py on the tiny DETR with random weights: fp32
on both runtimes, ours on both, NNCF and ONNX Runtime's quantize_static in
one table, each with the kernels its runtime executes in int8; bad input is
one line."""
import json

import pytest

from mmdet_hawq.errors import HawqUserError

from ..test_tools.test_deploy_tools import run_main

pytestmark = pytest.mark.slow


def test_random_weights_side_by_side(cfg_file, tmp_path, monkeypatch):
    pytest.importorskip('openvino', reason='openvino is the optional extra '
                        '(pip install -e .[openvino])')
    pytest.importorskip('nncf', reason='nncf is the optional extra '
                        '(pip install -e .[openvino])')
    out = tmp_path / 'runtimes.json'
    rows = ['fp32_onnxruntime', 'fp32_openvino_f32', 'ours_onnxruntime',
            'ours_openvino_f32', 'nncf_transformer',
            'nncf_accuracy_control_0.5', 'ort_quantize_static']
    assert run_main('benchmark_runtimes', monkeypatch, cfg_file,
                    '--random-weights', '--shape', 64, 64, '--images', 2,
                    '--rounds', 2, '--warmup', 1, '--threads', 1, 2,
                    '--no-memory', '--rows', *rows,
                    '--work-dir', tmp_path / 'work', '--out', out) == 0
    record = json.loads(out.read_text())
    got = record['rows']
    assert list(got) == [r for r in rows if r != 'nncf_accuracy_control_0.5']
    # accuracy control needs a metric: a row with its reason, not silence
    assert record['failed'] == [dict(
        row='nncf_accuracy_control_0.5',
        error='not run: needs a trained model (its validation is mAP)')]
    for r in got.values():
        assert set(r['latency']) == {'1', '2'}
        assert r['latency']['1']['runs'] == 4
    # the same file on both runtimes; ours and NNCF's on integer kernels
    assert got['ours_openvino_f32']['file'] == got['ours_onnxruntime']['file']
    for key in ('ours_onnxruntime', 'ours_openvino_f32', 'nncf_transformer'):
        kernels = got[key]['kernel_precisions']
        assert kernels.get('Convolution/int8', 0) > 0, key
        assert kernels.get('MatMul/int8', 0) > 0, key
    assert not any(p.endswith('/int8')
                   for p in got['fp32_openvino_f32']['kernel_precisions'])
    assert got['nncf_transformer']['quantize_s'] > 0
    assert any('NNCF\'s fastest' in line for line in record['targets'])


def test_bad_inputs(cfg_file, tiny_cfg, tmp_path, monkeypatch):
    with pytest.raises(HawqUserError, match='not both or neither'):
        run_main('benchmark_runtimes', monkeypatch, cfg_file)
    with pytest.raises(HawqUserError, match='pass --run WORK_DIR'):
        run_main('benchmark_runtimes', monkeypatch, cfg_file,
                 tiny_cfg.load_from)
    with pytest.raises(HawqUserError, match='random weights have no mAP'):
        run_main('benchmark_runtimes', monkeypatch, cfg_file,
                 '--random-weights', '--eval')

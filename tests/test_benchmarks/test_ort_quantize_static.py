"""benchmarks/ort_quantize_static.py on the tiny DETR: it writes an INT8 QDQ
model (QuantizeLinear→DequantizeLinear pairs) that ONNX Runtime runs, with
finite outputs of the fp32 model's shapes; bad input is one ``error:``
line."""
import json
import sys

import numpy as np
import onnx
import pytest

from mmdet_hawq.errors import HawqUserError

from ..test_tools.test_deploy_tools import run_main, tool

pytestmark = pytest.mark.slow


def test_writes_qdq_model_that_runs(cfg_file, tiny_cfg, tmp_path,
                                    monkeypatch, capsys):
    module = tool('ort_quantize_static')
    out = tmp_path / 'result.json'
    assert run_main('ort_quantize_static', monkeypatch, cfg_file,
                    tiny_cfg.load_from, '--methods', 'minmax', '--variants',
                    'all', 'float_decoder', '--num-images', 4,
                    '--max-images', 2, '--latency-images', 2,
                    '--latency-rounds', 1, '--warmup', 0, '--no-memory',
                    '--work-dir', tmp_path / 'work', '--out', out,
                    module=module) == 0
    with open(out) as f:
        record = json.load(f)
    assert record['calibration']['num_images'] == 4
    assert record['fp32']['images'] == 2 and 0 <= record['fp32']['mAP'] <= 1
    rows = {r['variant']: r for r in record['int8']}
    assert set(rows) == {'all', 'float_decoder'}
    assert all(r['method'] == 'MinMax' for r in rows.values())
    # fewer nodes quantized when the decoder stays float
    assert 0 < rows['float_decoder']['graph']['int8_compute_nodes'] < \
        rows['all']['graph']['int8_compute_nodes']

    import onnxruntime as ort
    path = rows['all']['model']
    graph = onnx.load(path).graph
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    quant = [n for n in graph.node if n.op_type == 'QuantizeLinear']
    assert quant and all(consumers[n.output[0]] == 'DequantizeLinear'
                         for n in quant)
    image = np.random.default_rng(0).uniform(
        0, 255, (1, 3, 128, 128)).astype(np.float32)
    outs = {}
    for key, model in (('fp32', record['fp32']['model']), ('int8', path)):
        session = ort.InferenceSession(model,
                                       providers=['CPUExecutionProvider'])
        outs[key] = session.run(None, {'image': image})
    for ref, got in zip(outs['fp32'], outs['int8']):
        assert got.shape == ref.shape and np.isfinite(got).all()
    for row in rows.values():
        assert row['outputs_vs_fp32']['finite']
        assert row['latency']['median_ms'] > 0 and row['speedup_vs_fp32'] > 0
        assert len(row['speedup_per_round']) == 1

    from mmdet_hawq.deploy.timing import measure_memory
    memory = measure_memory(path)  # a fresh process
    assert memory['peak_mib'] > memory['rss_load_mib'] > 0


def test_bad_inputs(cfg_file, tmp_path, monkeypatch, capsys):
    module = tool('ort_quantize_static')
    with pytest.raises(HawqUserError, match='does not exist'):
        run_main('ort_quantize_static', monkeypatch, cfg_file,
                 tmp_path / 'missing.pth', module=module)
    with pytest.raises(HawqUserError,
                       match="unknown calibration method 'kl'"):
        run_main('ort_quantize_static', monkeypatch, cfg_file,
                 tmp_path / 'missing.pth', '--methods', 'kl', module=module)
    with pytest.raises(HawqUserError, match='float_sampling'):
        run_main('ort_quantize_static', monkeypatch, cfg_file,
                 '--variants', 'nope', module=module)
    # through run_cli: one line, exit status 2
    monkeypatch.setattr(sys, 'argv', ['ort_quantize_static.py', cfg_file,
                                      str(tmp_path / 'missing.pth')])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.run_cli(module.main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: checkpoint file') and err.count('\n') == 1

"""benchmarks/benchmark_int8.py and validate_sensitivity.py --activations on
the tiny DETR: the side-by-side table has every model with its speedup and
integer kernels; the activation validation compares the run's predicted damage
with measured damage; bad input is one line."""
import json
import math

import pytest

from mmdet_hawq.errors import HawqUserError

from ..test_tools.test_deploy_tools import run_main, sensitivity_run, tool

pytestmark = pytest.mark.slow


def test_random_weights_side_by_side(cfg_file, tmp_path, monkeypatch):
    out = tmp_path / 'int8.json'
    assert run_main('benchmark_int8', monkeypatch, cfg_file,
                    '--random-weights', '--shape', 64, 64, '--images', 2,
                    '--rounds', 2, '--warmup', 1, '--no-memory', '--profile',
                    '--work-dir', tmp_path / 'work', '--out', out) == 0
    record = json.loads(out.read_text())
    rows = {r['variant']: r for r in record['results']}
    assert list(rows) == ['fp32', 'w8a8', 'ort_quantize_static',
                          'ort_quantize_static_u8_per_channel',
                          'ort_quantize_static_compute_u8_per_channel']
    assert rows['fp32']['speedup_vs_fp32'] == 1.0
    for r in rows.values():
        assert r['speedup_vs_fp32'] > 0 and len(r['speedup_per_round']) == 2
        assert r['latency']['runs'] == 4
    # every convolution of ours runs as QLinearConv, none of fp32's
    assert rows['w8a8']['integer_kernels']['QLinearConv'] == \
        rows['w8a8']['folded_batch_norms'] + 1  # + the neck's (no BN)
    assert 'QLinearConv' not in rows['fp32']['integer_kernels']
    assert record['input_shape'] == [64, 64]
    # the profile: shares of one image's kernel time per op type
    shares = rows['w8a8']['profile']
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert 'QLinearConv' in shares and 'Conv' in rows['fp32']['profile']


def test_activation_validation_and_bad_inputs(cfg_file, tiny_cfg, tmp_path,
                                              monkeypatch):
    from mmdet_hawq import QuantSettings, quantize
    from mmdet_hawq.report import write_run

    from ..conftest import build_from
    run = tmp_path / 'run'
    model, _ = sensitivity_run(tiny_cfg, run)
    out = tmp_path / 'val'
    assert run_main('validate_sensitivity', monkeypatch, cfg_file,
                    '--checkpoint', tiny_cfg.load_from, '--activations',
                    f'w8a8={run}', '--num-images', 4, '--bootstrap', 50,
                    '--out-dir', out) == 0
    record = json.loads((out / 'activations.json').read_text())
    layers = record['runs'][0]['layers']
    sites = json.loads((run / 'activation_sites.json').read_text())
    assert len(layers) == len({s['layer'] for s in sites})
    by_layer = {x['layer']: x for x in layers}
    for s in sites[:5]:  # the prediction is the run's, summed per layer
        assert by_layer[s['layer']]['predicted'] >= s['predicted_damage']
    assert any(x['measured'] != 0 for x in layers)
    corr = record['runs'][0]['correlations']['predicted']
    assert -1 <= corr['rho'] <= 1
    # the damage the run's choice read is compared too, once per layer (not
    # summed over its sites)
    for s in sites:
        assert by_layer[s['layer']]['choice'] == s['layer_damage']
    assert 'choice' in record['runs'][0]['correlations']
    weights_only = tmp_path / 'weights_only'
    write_run(str(weights_only), model, quantize(
        build_from(tiny_cfg), None, QuantSettings(metric='uniform', bits=8)))
    for args, message in (
            (('--activations', f'x={weights_only}'), 'activation_sites.json'),
            ((), 'give --report LABEL=DIR')):
        with pytest.raises(HawqUserError, match=message):
            run_main('validate_sensitivity', monkeypatch, cfg_file,
                     '--checkpoint', tiny_cfg.load_from, *args,
                     '--out-dir', out)
    with pytest.raises(HawqUserError, match='pass a float checkpoint, or '
                       '--random-weights'):
        run_main('benchmark_int8', monkeypatch, cfg_file)
    with pytest.raises(HawqUserError, match='--images takes a positive '
                       'integer, not 0'):
        run_main('benchmark_int8', monkeypatch, cfg_file, '--random-weights',
                 '--images', 0)
    with pytest.raises(HawqUserError, match='is not NAME=WORK_DIR'):
        run_main('benchmark_int8', monkeypatch, cfg_file, '--random-weights',
                 '--run', 'w8a8')


def test_top_share_is_the_damage_of_the_layers_ranked_first():
    top_share = tool('validate_sensitivity').top_share
    meas = [10.0, 5.0, 1.0, 0.1, -0.2]  # 90%: the first two layers
    assert top_share([3, 2, 1, 0, 0], meas) == 1.0
    assert top_share([0, 2, 3, 1, 0], meas) == pytest.approx(6 / 15)
    assert math.isnan(top_share([1, 2], [0.0, -1.0]))

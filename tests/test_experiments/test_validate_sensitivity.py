"""experiments/validate_sensitivity.py end to end on the tiny DETR: a
sensitivity run made by experiments/table1.py (``--no-uniform``) is checked
against the measured damage of every layer alone and of a few plans."""
import json
import math

import pytest
import torch

from ..conftest import run_table1, run_tool

pytestmark = pytest.mark.slow


def test_predicted_vs_measured_on_a_tiny_detr(tiny_cfg, tmp_path):
    cfg_file, work, rows = run_table1(
        tiny_cfg, tmp_path, '--methods', 'outquant:gauss_newton',
        '--no-uniform')
    assert [r['label'] for r in rows] == ['N/A', 'Out Sen Quant']
    run = work / 'rows' / rows[1]['out']
    out = tmp_path / 'val'
    proc = run_tool('experiments/validate_sensitivity.py', str(cfg_file),
                    '--checkpoint', tiny_cfg.load_from, '--report',
                    f'oq={run}', '--bits', '2', '3', '--num-images', '4',
                    '--plans', '3', '--plan-bits', '2', '3', '4',
                    '--plan-target', '3', '--map', '--out-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(out / 'validation.json'))
    layers = {r['name']: r for r in json.load(open(run / 'layers.json'))
              if r['included']}
    assert len(res['layers']) == 2 * len(layers)
    # the prediction is the report's trace times the ILP's error term
    # (outquant: against the 8-bit weights)
    state = torch.load(tiny_cfg.load_from)['state_dict']
    from mmdet_hawq.quant import quantization_error, fake_quantize
    for row in res['layers'][:6]:
        w = state[row['name']].float()
        err = quantization_error(w, row['bits'], fake_quantize(w, 8))
        expect = layers[row['name']]['trace_used'] * err
        assert abs(row['oq'] - expect) <= 1e-6 * max(abs(expect), 1e-30)
    # fewer bits never measure less damage in total, and quantizing
    # something must move the outputs
    total = {b: sum(r['measured'] for r in res['layers'] if r['bits'] == b)
             for b in (2, 3)}
    assert total[2] > total[3] > 0
    kinds = [p['kind'] for p in res['plans']]
    assert kinds == ['random'] * 3 + ['ilp oq']
    assert all(p['measured'] > 0 for p in res['plans'])
    assert all(abs(p['avg_bits'] - 3) <= 0.05 for p in res['plans'][:3])
    assert all(0 <= p['mAP'] <= 1 for p in res['plans'])
    corr = res['correlations'][0]
    assert -1 <= corr['layer_rho_all'] <= 1
    if len({p['mAP'] for p in res['plans']}) > 1:
        assert -1 <= corr['plan_map_rho'] <= 1
    else:  # a random tiny model scores 0 everywhere: no ranking
        assert math.isnan(corr['plan_map_rho'])
    assert (out / 'scatter_layers.png').is_file()
    assert len((out / 'validation.md').read_text().splitlines()) == 3
    bad = run_tool('experiments/validate_sensitivity.py', str(cfg_file),
                   '--checkpoint', tiny_cfg.load_from, '--report',
                   str(run), '--out-dir', str(out))
    assert bad.returncode == 2
    assert bad.stderr.strip().count('\n') == 0
    assert 'LABEL=DIR' in bad.stderr

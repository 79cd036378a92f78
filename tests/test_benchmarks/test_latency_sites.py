"""benchmarks/latency_sites.py on the tiny DETR: a latency table of its layers
measured on ONNX Runtime, and the fastest plans within a damage budget by
MACs and by measured time, each exported, timed and within its budget."""
import json

import pytest

from mmdet_hawq.errors import HawqUserError

from ..test_tools.test_deploy_tools import run_main, sensitivity_run

pytestmark = pytest.mark.slow


def test_latency_table_and_plans(cfg_file, tiny_cfg, tmp_path, monkeypatch):
    run = tmp_path / 'run'
    sensitivity_run(tiny_cfg, run / 'hawq')
    out = tmp_path / 'latency.json'
    assert run_main('latency_sites', monkeypatch, cfg_file, '--run', run,
                    '--runtime', 'onnxruntime', '--images', 2, '--rounds', 1,
                    '--budgets', 0.0, 0.5, 1.0, '--work-dir',
                    tmp_path / 'work', '--out', out) == 0
    record = json.loads(out.read_text())
    layers = {s['layer'] for s in json.loads(
        (run / 'hawq' / 'activation_sites.json').read_text())}
    assert set(record['gains_ms']) == set(record['damage']) == layers
    total = sum(record['damage'].values())
    rows = {r['plan']: r for r in record['rows']}
    assert set(rows) == {f'{by}_{b:g}' for by in ('macs', 'latency')
                         for b in (0.0, 0.5, 1.0)}
    for key, row in rows.items():
        chosen = record['plans'][key]
        assert sum(record['damage'][g] for g in chosen) <= \
            row['budget'] * total + 1e-9
        assert row['latency']['runs'] == 2
    # the whole budget: every layer that gains anything goes int8
    assert set(record['plans']['macs_1']) == {
        g for g, m in record['macs'].items() if m > 0}
    with pytest.raises(HawqUserError, match='packed.pth. does not exist'):
        run_main('latency_sites', monkeypatch, cfg_file, '--run',
                 tmp_path / 'missing')

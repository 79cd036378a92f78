"""experiments/table1.py end to end on the tiny DETR (3-bit rows only, tiny
calibration budget): every row is produced and the markdown table is
consistent with the JSON."""
import json

import pytest

from mmdet_hawq.evaluation import matched_images, resampled_map

from ..conftest import run_table1, run_tool

pytestmark = pytest.mark.slow


def test_table1_smoke(tiny_cfg, tmp_path):
    _, work, rows = run_table1(tiny_cfg, tmp_path)
    labels = [(r['precision'], r['label'], r['estimator']) for r in rows]
    assert labels[:3] == [('Float', 'N/A', ''), ('8-bit', 'Uniform', ''),
                          ('3-bit', 'Uniform', '')]
    assert len(rows) == 3 + 5  # float, 8-bit, 3-bit uniform + 5 methods
    assert all(r['avg_bits'] <= 3 + 1e-9 for r in rows[2:])
    table = (work / 'table1.md').read_text().splitlines()
    assert len(table) == 2 + len(rows)
    assert (work / 'fig1_traces.png').is_file()
    # every row's detections are kept and bootstrapped over the val images
    ann = tiny_cfg.test_evaluator.ann_file
    for r in rows:
        dets = str(work / 'rows' / r['out'] / 'detections.bbox.json')
        ev = matched_images(ann, dets)
        assert resampled_map(ev, range(4)) == pytest.approx(r['mAP'],
                                                            abs=5e-4)
        assert r['bootstrap_reps'] == 200
        assert r['mAP_ci'][0] <= r['mAP_ci'][1]
        assert len(r['mAP_replicates']) == 200
    # the sensitivity rows' Δ vs uniform carries the paired interval
    assert 'Δ vs uniform (paired 95% interval)' in table[0]
    assert all(' to ' in line.split(' | ')[5] for line in table[-5:])


def test_table1_methods_and_temperature_on_a_tiny_dino(family_cfg, tmp_path):
    cfg = family_cfg('dino')
    cfg_file, work, rows = run_table1(
        cfg, tmp_path, '--methods', 'outquant:gauss_newton',
        '--temperature', '2', name='dino')
    assert [(r['label'], r['estimator']) for r in rows[3:]] == [
        ('Out Sen Quant', 'gauss_newton')]
    traces = json.load(open(work / 'rows' / rows[3]['out'] / 'traces.json'))
    assert traces['meta']['key']['settings']['temperature'] == 2.0
    assert traces['meta']['key']['settings']['lambda_kl'] == 0.05
    # without --min-bits the hook's default floors hold: deformable
    # attention's offsets and attention weights stay at 3 bits or more
    plan = json.load(open(work / 'rows' / rows[3]['out'] / 'plan.json'))
    held = [n for n in plan if n.endswith(('sampling_offsets.weight',
                                           'attention_weights.weight'))]
    assert held and all(plan[n]['bits'] >= 3 for n in held)
    bad = run_tool('experiments/table1.py', str(cfg_file), '--checkpoint',
                   cfg.load_from, '--methods', 'outquant:newton')
    assert bad.returncode == 2 and 'outquant:newton' in bad.stderr


def test_table1_seeds_repeat_the_sensitivity_rows(tiny_cfg, tmp_path):
    _, work, rows = run_table1(tiny_cfg, tmp_path, '--methods',
                               'outquant:gauss_newton', '--seeds', '2')
    uniform, osq = rows[2], rows[3]
    assert 'mAP_runs' not in uniform  # nothing random to repeat
    assert len(osq['mAP_runs']) == 2
    assert osq['mAP'] == sum(osq['mAP_runs']) / 2
    # two calibration sets: two trace runs with their own seeds
    seeds = {json.load(open(work / 'rows' / f'3-bit_outquant_gauss_newton_'
                            f'seed{s}' / 'traces.json'))['meta']['key'][
                                'settings']['seed'] for s in (0, 1)}
    assert seeds == {0, 1}
    # each seed's run keeps its own detections; the interval is seed 0's
    for s in (0, 1):
        assert (work / 'rows' / f'3-bit_outquant_gauss_newton_seed{s}' /
                'detections.bbox.json').is_file()
    assert ' ± ' in (work / 'table1.md').read_text().splitlines()[-1]


def test_table1_critical_classes_report_their_ap(tiny_cfg, tmp_path):
    cfg_file, work, rows = run_table1(
        tiny_cfg, tmp_path, '--methods', 'outquant:gauss_newton',
        '--critical-classes', 'cross', 'ellipse', '--also-all-classes')
    assert [r.get('kl_classes') for r in rows] == [
        None, None, None, 'all', ['cross', 'ellipse']]
    for r in rows:  # float and uniform rows too
        assert set(r['critical_AP']) == {'cross', 'ellipse'}
        aps = list(r['critical_AP'].values())
        # NaN: a class without boxes among the 4 val images
        assert r['critical_mAP'] == pytest.approx(sum(aps) / 2, nan_ok=True)
    keys = [json.load(open(work / 'rows' / r['out'] / 'traces.json'))[
        'meta']['key']['settings'] for r in rows[3:]]
    assert 'critical_classes' not in keys[0]
    assert keys[1]['critical_classes'] == ['ellipse', 'cross']
    table = (work / 'table1.md').read_text().splitlines()
    assert '| KL classes |' in table[0] and '| cross AP | ellipse AP |' \
        in table[0] and 'critical mean AP' in table[0]
    assert table[-1].split(' | ')[3] == 'cross, ellipse'
    bad = run_tool('experiments/table1.py', str(cfg_file), '--checkpoint',
                   tiny_cfg.load_from, '--work-dir', str(work / 'bad'),
                   '--critical-classes', 'sqare')
    assert bad.returncode == 2
    assert ("'sqare' is not a class of the dataset: the classes are "
            'ellipse, rectangle, triangle, cross') in bad.stderr

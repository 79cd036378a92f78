"""experiments/option_matrix.py: the bounds and the table from row files
(fast), and the three activation range methods end to end on the small DETR, on
a subset of the val images, with a second run that resumes (slow)."""
import importlib.util
import json
import os.path as osp
import sys
import time

import pytest

from mmdet_hawq.errors import HawqUserError

from ..conftest import ROOT, run_tool


def option_matrix():
    """experiments/option_matrix.py as a module (its main() runs
    in-process)."""
    spec = importlib.util.spec_from_file_location(
        'hawq_tool_option_matrix',
        osp.join(ROOT, 'experiments', 'option_matrix.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounds_and_table(tmp_path, monkeypatch):
    """Rows written by hand: the table checks each against its bound, lists
    the ones outside it first with their warnings, and keeps failed runs."""
    m = option_matrix()
    out = tmp_path / 'matrix'
    monkeypatch.chdir(tmp_path)  # main() moves to the repository

    def row(name, **fields):
        record = dict(dict(model='detr', row=name, status='ok', warnings=[],
                           commands=[], seconds=1.0,
                           key=m.row_key(m.BY_NAME[name], None)), **fields)
        m.write_json(str(out / 'rows' / 'detr' / f'{name}.json'), record)

    row('float', mAP=43.5)
    row('uniform_8bit', mAP=42.5, warnings=['traces did not converge'])
    row('uniform_5bit', mAP=41.5)
    row('outquant_5bit_gauss_newton', mAP=42.9)
    row('plan_from_outquant_5bit', mAP=42.8)
    row('losssen_5bit_gauss_newton', status='error', error="ptq exit 2: "
        "error: metric 'losssen' has no Gauss-Newton form (...)")
    row('w8a8_mse', mAP=43.1, ort_mAP=42.7)
    row('w8a8_mse_sensitivity', mAP=43.1, ort_mAP=43.0)
    row('w8a8_onnx_opset17', status='error',
        error='export_onnx exit 2: error: opset 17 is too old')
    monkeypatch.setattr(sys, 'argv', ['option_matrix.py', '--out', str(out),
                                      '--models', 'detr', '--report'])
    assert m.main() == 0
    by = {r['row']: r for r in json.load(open(out / 'matrix.json'))[
        'records']}
    assert by['float']['within_bound'] is True  # 43.5 = results.md
    assert by['uniform_8bit']['delta'] == -1.0  # the paper's 0.9 exceeded
    assert by['uniform_8bit']['within_bound'] is False
    assert by['uniform_5bit']['within_bound'] is True  # Δ -2.0 >= -3.0
    assert by['plan_from_outquant_5bit']['within_bound'] is False  # not same
    assert by['losssen_5bit_gauss_newton']['within_bound'] is True  # fails
    assert by['w8a8_mse']['ort_delta'] == -0.4
    assert by['w8a8_mse']['within_bound'] is False  # ORT 0.4 off
    assert by['w8a8_mse_sensitivity']['within_bound'] is True
    assert by['w8a8_onnx_opset17']['mAP'] == 43.1  # its source's PyTorch
    assert by['w8a8_onnx_opset17']['within_bound'] is False
    assert by['w4a8']['status'] == 'not run'  # chosen, not run yet
    assert by['w4a8']['within_bound'] is None
    table = (out / 'matrix.md').read_text()
    outside = table.split('## All rows')[0]
    assert 'Outside their bound: 4 of' in outside
    assert '1: traces did not converge' in outside
    for name in ('uniform_8bit', 'plan_from_outquant_5bit', 'w8a8_mse',
                 'w8a8_onnx_opset17'):
        assert f'| detr | {name} |' in outside
    assert 'opset 17 is too old' in outside
    assert f'--out {out} --models detr --report' in table
    with pytest.raises(HawqUserError, match='matches no row'):
        monkeypatch.setattr(sys, 'argv', ['option_matrix.py', '--rows', 'x'])
        m.main()


RANGE_ROWS = ('w8a8_minmax', 'w8a8_percentile', 'w8a8_mse')


@pytest.mark.slow
def test_range_methods_on_a_subset_then_resume(tmp_path):
    """W8A8 with each range method on the small DETR, 200 val images and 8
    calibration images, exported and evaluated under ONNX Runtime: every
    row within 1.5 of float on the same images (the rows' bound, 1.0, plus
    0.5 for the subset and the small calibration set) and ONNX Runtime
    within 0.3 of PyTorch; a second run runs nothing."""
    args = ['experiments/option_matrix.py', '--out', str(tmp_path), '--models',
            'detr', '--rows', *RANGE_ROWS, '--quick', '200']
    start = time.time()
    proc = run_tool(*args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f'option matrix, 4 rows: {time.time() - start:.0f} s')
    rows = {n: tmp_path / 'rows' / 'detr' / f'{n}.json'
            for n in ('float', *RANGE_ROWS)}
    assert all(f.is_file() for f in rows.values())
    by = {r['row']: r for r in json.load(open(tmp_path / 'matrix.json'))[
        'records']}
    assert by['float']['quick'] == 200 and by['float']['mAP'] > 30
    for name in RANGE_ROWS:
        r = by[name]
        assert r['status'] == 'ok', r['error']
        assert r['delta'] >= -1.5, r
        assert abs(r['ort_delta']) <= 0.3, r
        assert len(r['commands']) == 3  # ptq, export_onnx, evaluate_onnx
    table = (tmp_path / 'matrix.md').read_text()
    assert all(f'| detr | {n} (quick) |' in table for n in RANGE_ROWS)
    mtimes = {n: f.stat().st_mtime for n, f in rows.items()}
    again = run_tool(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '0 row(s) run, 4 finished before' in again.stdout
    assert mtimes == {n: f.stat().st_mtime for n, f in rows.items()}

"""report.py: the per-layer tables and the figures a run leaves."""
import csv
import json
import os.path as osp

import pytest

from mmdet_hawq.report import (plot_bits, plot_prediction_scatter,
                               plot_traces, write_layer_report,
                               write_sensitivity_report)

PNG = b'\x89PNG\r\n\x1a\n'


def png_size(path: str):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == PNG, path
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24],
                                                              'big')


def test_layer_report_columns_are_every_key_in_order(tmp_path):
    rows = [dict(name='a.weight', bits=4), dict(name='b.weight', bits=None,
                                                 reason='float', shape=[2, 3])]
    paths = write_layer_report(str(tmp_path / 'out'), rows,
                               dict(avg_bits=4.0))
    with open(paths['csv'], newline='') as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ['name', 'bits', 'reason', 'shape']
    assert table[0] == dict(name='a.weight', bits='4', reason='', shape='')
    assert json.loads(table[1]['shape']) == [2, 3]  # lists as JSON
    with open(paths['json']) as f:
        assert json.load(f) == rows
    with open(paths['summary']) as f:
        assert json.load(f) == dict(avg_bits=4.0)


def test_no_rows_no_csv(tmp_path):
    paths = write_layer_report(str(tmp_path), [], {})
    assert not osp.exists(paths['csv']) and osp.isfile(paths['json'])


def test_sensitivity_report_keeps_every_sample(tmp_path):
    traces = dict(names=['a', 'b'], samples=[[1.0, 2.0], [3.0, 0.0]],
                  mean=[2.0, 1.0], se=[1.0, 1.0], tol=0.05)
    pareto = [dict(avg_bits=3.0, perturbation=2.0),
              dict(avg_bits=4.0, perturbation=0.0)]
    write_sensitivity_report(str(tmp_path), 'outquant', 'gauss_newton',
                             ['a', 'b'], traces, pareto)
    with open(tmp_path / 'traces.json') as f:
        assert json.load(f) == traces
    with open(tmp_path / 'pareto.json') as f:
        assert json.load(f) == pareto
    for name in ('traces.png', 'pareto.png'):
        assert png_size(str(tmp_path / name))[0] > 100


@pytest.mark.parametrize('count', [3, 40])
def test_figures_take_float_layers_and_nonpositive_values(tmp_path, count):
    names = [f'encoder.layers.{i}.w' for i in range(count)]
    traces = {'outquant': dict(mean=[0.0] + [1.0] * (count - 1),
                               se=[0.1] * count)}
    a = plot_traces(str(tmp_path / 't.png'), names, traces)
    b = plot_bits(str(tmp_path / 'b.png'), names,
                  {'plan': {n: (None if i == 0 else 4)
                            for i, n in enumerate(names)}})
    c = plot_prediction_scatter(str(tmp_path / 's.png'),
                                {'m': ([1.0, 0.0], [2.0, 3.0])}, 'title')
    for path in (a, b, c):
        assert png_size(path)[1] > 100

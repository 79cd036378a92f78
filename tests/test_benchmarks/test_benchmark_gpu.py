"""benchmarks/benchmark_gpu.py: a CPU smoke run on the small DINO (the GPU run
itself needs a GPU) and its one-line refusal without CUDA."""
import json

import pytest
import torch

from ..conftest import run_tool

pytestmark = pytest.mark.slow


def test_cpu_smoke_run_on_the_small_dino(tmp_path):
    """Every row of a model that runs, and a model that cannot be built:
    its row records the error, the run goes on, the JSON is written and the
    exit status says a row failed."""
    out = tmp_path / 'gpu.json'
    proc = run_tool('benchmarks/benchmark_gpu.py', '--device', 'cpu',
                    '--height',
                    '64', '--width', '64', '--models', 'configs/missing.py',
                    'configs/dino/dino_tiny_shapes.py', '--repeats', '1',
                    '--step-images', '2', '--step-samples', '2', '--out',
                    str(out))
    # the failed row makes the exit status 1, after the JSON is written
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'failed rows: configs/missing.py' in proc.stdout
    missing, row = json.load(open(out))['models']
    assert missing['config'] == 'configs/missing.py'
    assert 'missing.py' in missing['error'] and missing['where']
    assert 'FAILED' in proc.stdout
    assert row['type'] == 'DINO' and row['weights'] > 50
    for key in ('forward_backward', 'gauss_newton_sample', 'hvp',
                'hutchinson_sample', 'sensitivity_step'):
        assert row[key]['seconds'] > 0, (key, row[key])
    assert row['sensitivity_step']['images'] == 2
    assert row['sensitivity_step']['samples'] == 2
    ratio = row['hutchinson_sample']['x_hvp']
    assert ratio == pytest.approx(row['hutchinson_sample']['seconds'] /
                                  row['hvp']['seconds'], abs=1e-3)
    assert row['gauss_newton_profile']['by_cpu'][0]['calls'] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_no_cuda_is_one_clear_line(tmp_path):
    proc = run_tool('benchmarks/benchmark_gpu.py', '--out',
                    str(tmp_path / 'x.json'))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith('error:')]
    assert len(lines) == 1 and 'no CUDA device' in lines[0]


def test_bilinear_benchmark_prints_three_steps_side_by_side():
    proc = run_tool('benchmarks/benchmark_bilinear.py', '--threads', '1',
                    '--repeats', '1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split('  ')[0]: line.split()[-1]
            for line in proc.stdout.splitlines()
            if line.startswith(('forward', 'double'))}
    assert set(rows) == {'forward (no grad)', 'forward+backward',
                         'double backward'}
    assert all(float(r) > 0 for r in rows.values())

"""tools/benchmark_gpu.py: a CPU smoke run on the small DINO (the GPU run
itself needs a GPU) and its one-line refusal without CUDA."""
import json

import pytest
import torch

from ..conftest import run_tool


def test_cpu_smoke_run_on_the_small_dino(tmp_path):
    out = tmp_path / 'gpu.json'
    proc = run_tool('tools/benchmark_gpu.py', '--device', 'cpu', '--height',
                    '64', '--width', '64', '--models',
                    'configs/dino_tiny_shapes.py', '--repeats', '1',
                    '--out', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row, ) = json.load(open(out))['models']
    assert row['type'] == 'DINO' and row['weights'] > 50
    for key in ('forward_backward', 'gauss_newton_sample',
                'hutchinson_sample'):
        assert row[key]['seconds'] > 0
    assert row['forward_backward']['x_forward_backward'] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_no_cuda_is_one_clear_line(tmp_path):
    proc = run_tool('tools/benchmark_gpu.py', '--out',
                    str(tmp_path / 'x.json'))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith('error:')]
    assert len(lines) == 1 and 'no CUDA device' in lines[0]

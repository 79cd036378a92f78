"""tools/dist_ptq.sh: 2 CPU processes over gloo (torchrun, loopback only)
on the small DETR give the traces, plan and mAP of one process; a rank that
dies or hangs stops the whole run with an error.

The single-process reference runs with one intra-op thread, as each torchrun
process does: float32 reductions split over two threads round differently
(about 1e-7 relative), which could flip a near-tie of the ILP."""
import json
import os.path as osp
import sys
import time

import numpy as np
import pytest

from ..conftest import ROOT, free_port, run_tool

pytestmark = pytest.mark.slow

VAL = osp.join(ROOT, 'data', 'shapes', 'annotations', 'instances_val.json')
SMALL = ['test_dataloader.dataset.indices=40',
         'custom_hooks.0.calibration.num_images=8',
         'custom_hooks.0.calibration.batch_size=2',  # 4 batches, 2 per rank
         'custom_hooks.0.sensitivity.min_samples=3',
         'custom_hooks.0.sensitivity.max_samples=3']
ONE_THREAD = dict(OMP_NUM_THREADS='1')
needs_data = pytest.mark.skipif(not osp.isfile(VAL),
                                reason='run `make data` first')


def torchrun(script, *args, env=None, timeout=600):
    return run_tool('-m', 'torch.distributed.run', '--nproc_per_node', '2',
                    '--master_addr', '127.0.0.1', '--master_port',
                    str(free_port()), script, *args, env=env,
                    timeout=timeout)


def outputs(work):
    traces = json.load(open(osp.join(work, 'hawq', 'traces.json')))
    plan = json.load(open(osp.join(work, 'hawq', 'plan.json')))
    metrics = json.load(open(osp.join(work, 'ptq_results.json')))[
        'quantized']['metrics']
    return np.array(traces['samples']), traces['estimator'], plan, metrics


@needs_data
@pytest.mark.parametrize('config,estimator', [
    ('configs/detr/detr_tiny_shapes_outquant_4bit.py', 'gauss_newton'),
    ('configs/detr/detr_tiny_shapes_losssen_4bit.py', 'hutchinson'),
])
def test_two_processes_match_one(tmp_path, config, estimator):
    one = run_tool('tools/ptq.py', config, '--work-dir', str(tmp_path / '1'),
                   '--cfg-options', *SMALL, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_tool(
        '-c',
        'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))',
        'bash', 'tools/dist_ptq.sh', config, '2', '--work-dir',
        str(tmp_path / '2'), '--cfg-options', *SMALL,
        env=dict(PORT=str(free_port()), PYTHON=sys.executable))
    assert two.returncode == 0, two.stderr[-3000:]
    s1, e1, plan1, m1 = outputs(tmp_path / '1')
    s2, e2, plan2, m2 = outputs(tmp_path / '2')
    assert e1 == e2 == estimator
    assert s1.shape == s2.shape == (3, len(plan1))
    rel = np.abs(s2 - s1) / np.abs(s1)
    assert rel.max() <= 1e-5, rel.max()
    assert plan1 == plan2
    assert m1 == m2 and m1['coco/bbox_mAP'] > 0
    # only rank 0 printed the summary
    assert two.stdout.count('== mmdet-hawq PTQ summary ==') == 1


@needs_data
@pytest.mark.parametrize('fault', ['kill', 'hang'])
def test_failed_rank_stops_the_run(tmp_path, fault):
    start = time.time()
    proc = torchrun('tests/test_tools/fault_injection.py',
                    'configs/detr/detr_tiny_shapes_outquant_4bit.py',
                    '--launcher', 'pytorch', '--dist-timeout', '10',
                    '--work-dir', str(tmp_path), '--cfg-options', *SMALL,
                    env=dict(HAWQ_FAULT=fault), timeout=300)
    seconds = time.time() - start
    assert proc.returncode != 0
    assert seconds < 120, seconds
    if fault == 'hang':  # rank 0 gave up waiting, with the reason
        assert 'did not answer within the collective timeout' in proc.stderr
        assert 'terminate called' not in proc.stderr  # a clean exit
    else:
        assert 'SIGKILL' in proc.stderr
    assert not osp.exists(tmp_path / 'ptq_results.json')

"""engine/process_group.py, api/dist.py and the sharded estimators, on 2 CPU
processes over gloo (loopback only): sharded traces equal one process's,
rank 0's results and errors reach every rank, and a silent rank makes the
others stop."""
import os
import pickle
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from mmdet_hawq.api.dist import process_shard, run_on_main
from mmdet_hawq.engine.process_group import init_cpu_process_group
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.sensitivity import (Shard, gauss_newton_traces,
                                    hutchinson_traces, softmax_fisher_draw)
from ..conftest import free_port
from ..test_sensitivity.test_estimators import (LAM, MLP, T, objective,
                                                targets)

pytestmark = pytest.mark.slow

NUM_BATCHES = 5  # uneven: rank 0 gets 3, rank 1 gets 2


def problem(device: str = 'cpu'):
    """An MLP student off its teacher, 5 batches, the three estimators, on
    ``device``."""
    torch.manual_seed(0)
    teacher = MLP().double()
    model = MLP().double()
    with torch.no_grad():
        for p, q in zip(model.parameters(), teacher.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    xs = [torch.randn(3, 7, 4, dtype=torch.float64).to(device)
          for _ in range(NUM_BATCHES)]
    model, teacher = model.to(device), teacher.to(device)
    loss_fn = objective('distill_quant', model, teacher, xs, None)
    n_total = sum(x[..., 0].numel() for x in xs)

    def gn_sample(i, gen):
        z = model(xs[i])
        return (softmax_fisher_draw(z, T, LAM / n_total, gen) * z).sum()

    return model, loss_fn, gn_sample


def estimate(shard, device: str = 'cpu'):
    model, loss_fn, gn_sample = problem(device)
    common = dict(tol=0.0, max_samples=4, seed=11, shard=shard)
    return dict(
        hutchinson=hutchinson_traces(targets(model), loss_fn,
                                     range(NUM_BATCHES), **common).samples,
        per_layer=hutchinson_traces(targets(model), loss_fn,
                                    range(NUM_BATCHES), per_layer=True,
                                    **common).samples,
        gauss_newton=gauss_newton_traces(targets(model), gn_sample,
                                         range(NUM_BATCHES),
                                         **common).samples)


def _init(rank, port, timeout_s):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE='2')
    init_cpu_process_group(timeout_s)


def _estimate_worker(rank, port, out, device='cpu'):
    _init(rank, port, 60)
    shard = process_shard()
    assert (shard.rank, shard.world_size) == (rank, 2)
    samples = estimate(shard, device)
    with open(f'{out}.{rank}', 'wb') as f:
        pickle.dump(samples, f)
    torch_dist.destroy_process_group()


def _run_on_main_worker(rank, port, out):
    _init(rank, port, 60)
    value = run_on_main(lambda: {'rank': torch_dist.get_rank()})

    def fails():
        raise HawqUserError('the ILP is infeasible on rank 0')

    try:
        run_on_main(fails)
        error = None
    except HawqUserError as err:
        error = str(err)
    with open(f'{out}.{rank}', 'wb') as f:
        pickle.dump((value, error), f)
    torch_dist.destroy_process_group()


def _silent_rank_worker(rank, port, out):
    _init(rank, port, 3)
    if rank == 1:  # never joins the all-reduce; stays alive until rank 0
        deadline = time.time() + 60  # has given up (so its exit is no cue)
        while not os.path.exists(f'{out}.0') and time.time() < deadline:
            time.sleep(0.2)
        os._exit(0)  # see below
    start = time.time()
    try:
        process_shard().sum(torch.ones(3, dtype=torch.float64))
        error = None
    except HawqUserError as err:
        error = str(err)
    with open(f'{out}.0.tmp', 'wb') as f:
        pickle.dump((error, time.time() - start), f)
    os.replace(f'{out}.0.tmp', f'{out}.0')
    # skip the teardown of a process group whose collective failed: its
    # backend threads abort the interpreter's exit (as tools/ptq.py does)
    os._exit(0)


def spawn(worker, tmp_path, *args):
    out = str(tmp_path / 'out')
    mp.spawn(worker, args=(free_port(), out) + args, nprocs=2, join=True)
    results = []
    for rank in range(2):
        if os.path.exists(f'{out}.{rank}'):
            with open(f'{out}.{rank}', 'rb') as f:
                results.append(pickle.load(f))
    return results


def check_sharded_traces(tmp_path, device: str = 'cpu') -> None:
    """Two processes' all-reduced samples on ``device`` equal one
    process's."""
    single = estimate(None, device)
    ranks = spawn(_estimate_worker, tmp_path, device)
    assert len(ranks) == 2
    for kind, rows in single.items():
        ref = torch.tensor(rows)
        for got in ranks:  # every rank holds the all-reduced samples
            got = torch.tensor(got[kind])
            assert got.shape == ref.shape == (4, len(rows[0]))
            rel = ((got - ref).abs() / ref.abs()).max().item()
            assert rel <= 1e-12, (kind, rel)
    # the draws differ from sample to sample (the check is not vacuous)
    assert single['gauss_newton'][0] != single['gauss_newton'][1]


def test_sharded_traces_equal_one_process(tmp_path):
    check_sharded_traces(tmp_path)


def test_shard_positions_cover_the_set_once():
    shards = [Shard(r, 3).positions(7) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert Shard().positions(4) == [0, 1, 2, 3]
    assert Shard(5, 8).positions(4) == []  # more ranks than batches
    assert Shard().sum(torch.tensor([2.0])).item() == 2.0


def test_run_on_main_gives_rank0_result_and_error(tmp_path):
    ranks = spawn(_run_on_main_worker, tmp_path)
    assert [v for v, _ in ranks] == [{'rank': 0}, {'rank': 0}]
    assert [e for _, e in ranks] == ['the ILP is infeasible on rank 0'] * 2


def test_silent_rank_stops_the_others(tmp_path):
    (error, seconds), = spawn(_silent_rank_worker, tmp_path)
    assert error is not None and 'rank 0 of 2' in error
    assert 'collective timeout' in error and '--dist-timeout' in error
    assert seconds < 30  # the 3 s timeout (slack for a loaded machine)


def test_torchrun_environment_is_required(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    if torch_dist.is_initialized():
        pytest.skip('a process group exists in this process')
    with pytest.raises(HawqUserError, match='torchrun'):
        init_cpu_process_group()

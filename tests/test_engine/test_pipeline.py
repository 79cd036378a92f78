"""The trace cache key: per kind of device, CPU keys as before."""
import torch

from mmdet_hawq.engine.pipeline import (DRAWS_VERSION, _cache_key,
                                        resolve_settings)


def test_cache_key_names_the_device_type_of_the_draws(tiny_cfg):
    """A CUDA run resumes only from CUDA samples (its generator draws
    another stream); a CPU run's key is the one earlier releases wrote."""

    class FakeRunner:
        cfg = tiny_cfg

    s = resolve_settings('outquant', None)
    cpu = _cache_key(FakeRunner(), 'outquant', s, [1, 2])
    assert cpu == _cache_key(FakeRunner(), 'outquant', s, [1, 2], None,
                             torch.device('cpu'))
    assert cpu['draws'] == DRAWS_VERSION
    cuda = _cache_key(FakeRunner(), 'outquant', s, [1, 2], None,
                      torch.device('cuda', 0))
    assert cuda['draws'] == f'{DRAWS_VERSION}-cuda'
    assert {k: v for k, v in cuda.items() if k != 'draws'} == \
        {k: v for k, v in cpu.items() if k != 'draws'}
    # every CUDA device draws the same stream: one key for all of them
    assert cuda == _cache_key(FakeRunner(), 'outquant', s, [1, 2], None,
                              torch.device('cuda', 3))

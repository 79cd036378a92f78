"""The trace cache key: per kind of device, CPU keys as before."""
import torch

from mmdet_hawq.api import QuantSettings
from mmdet_hawq.api.traces import DRAWS_VERSION, cache_key

SOURCE = dict(model='m', checkpoint=None)


def test_cache_key_names_the_device_type_of_the_draws():
    """A CUDA run resumes only from CUDA samples (its generator draws
    another stream); a CPU run's key is the one earlier releases wrote."""
    s = QuantSettings(target_bits=4).trace_settings()
    cpu = cache_key('outquant', s, [1, 2], SOURCE, None, torch.device('cpu'))
    assert cpu['draws'] == DRAWS_VERSION
    cuda = cache_key('outquant', s, [1, 2], SOURCE, None,
                     torch.device('cuda', 0))
    assert cuda['draws'] == f'{DRAWS_VERSION}-cuda'
    assert {k: v for k, v in cuda.items() if k != 'draws'} == \
        {k: v for k, v in cpu.items() if k != 'draws'}
    # every CUDA device draws the same stream: one key for all of them
    assert cuda == cache_key('outquant', s, [1, 2], SOURCE, None,
                             torch.device('cuda', 3))


def test_cache_key_changes_with_what_changes_the_samples():
    """Another calibration set, model, checkpoint or per-channel 8-bit
    point is another key; the stopping rule and the cache folder are not
    part of it."""
    s = QuantSettings(target_bits=4).trace_settings()
    cpu = torch.device('cpu')
    base = cache_key('outquant', s, [1, 2], SOURCE, None, cpu)
    assert base != cache_key('outquant', s, [1, 3], SOURCE, None, cpu)
    assert base != cache_key('outquant', s, [1, 2],
                             dict(SOURCE, checkpoint='x'), None, cpu)
    assert base != cache_key('outquant', s, [1, 2], SOURCE, 0, cpu)
    assert base == cache_key(
        'outquant', dict(s, tol=0.5, max_samples=3, cache_dir='/x'),
        [1, 2], SOURCE, None, cpu)


def test_caches_of_an_earlier_release_are_found_not_read(tmp_path):
    """A cache file of the same run whose key has another form (here: no
    ``proposals`` setting, as releases before 0.2 wrote) is named by
    ``older_caches``; the same form for another checkpoint is not, and
    neither is read as this run's samples."""
    from mmdet_hawq.sensitivity import (TraceResult, cache_path, load_cached,
                                        older_caches, save_cached)
    s = QuantSettings(target_bits=4).trace_settings()
    key = cache_key('outquant', s, [1, 2], SOURCE, None, torch.device('cpu'))
    older = dict(key, settings={k: v for k, v in key['settings'].items()
                                if k != 'proposals'})
    other = dict(key, checkpoint='another')
    result = TraceResult(['w'], [4], [[1.0]])
    for k in (older, other):
        save_cached(cache_path(str(tmp_path), 'outquant', 'gauss_newton', k),
                    k, result)
    # another run's file in the same folder (critical classes, per-channel
    # scales: settings written only away from their defaults) is not one
    for extra in (dict(critical_classes=['cross']), dict(per_channel=True)):
        k = dict(key, settings=dict(key['settings'], **extra))
        save_cached(cache_path(str(tmp_path), 'outquant', 'gauss_newton', k),
                    k, result)
    found = older_caches(str(tmp_path), 'outquant', 'gauss_newton', key,
                         ('critical_classes', 'per_channel'))
    assert found == [cache_path(str(tmp_path), 'outquant', 'gauss_newton',
                                older)]
    assert load_cached(cache_path(str(tmp_path), 'outquant', 'gauss_newton',
                                  key), key) is None

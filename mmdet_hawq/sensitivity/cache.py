"""On-disk cache of trace samples: resume an interrupted run, reuse a
finished one.

A cache file holds a :class:`~.traces.TraceResult` (every sample) and the key
it was computed for: hashes of the model config, the checkpoint and the
calibration set, the objective, the estimator, the seed and the settings.
It is rewritten atomically after every sample.
"""
import glob
import hashlib
import json
import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence

from .sampling import TraceResult


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def key_hash(key: Dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable key."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, objective: str, estimator: str,
               key: Dict[str, Any]) -> str:
    """File of one (objective, estimator, key) run."""
    return osp.join(cache_dir,
                    f'traces_{objective}_{estimator}_{key_hash(key)}.json')


def load_cached(path: str, key: Dict[str, Any]) -> Optional[TraceResult]:
    """The saved samples at ``path`` if their key equals ``key``."""
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # a truncated file is recomputed, never trusted
    if data.get('key') != json.loads(json.dumps(key, default=str)):
        return None
    return TraceResult.from_dict(data['result'])


def save_cached(path: str, key: Dict[str, Any], result: TraceResult) -> None:
    """Write samples and key atomically."""
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(dict(key=key, result=result.to_dict()), f, default=str)
    os.replace(tmp, path)


def saved_samples_note(cache_dir: str) -> str:
    """What an interrupted run has saved in the sensitivity cache.

    Args:
        cache_dir (str): The hook's sensitivity cache folder.

    Returns:
        str: How many samples the newest cache file holds, where, and that
        rerunning the same command resumes from them.
    """
    files = sorted(glob.glob(osp.join(cache_dir, 'traces_*.json')),
                   key=osp.getmtime)
    try:
        with open(files[-1]) as f:
            num = len(json.load(f)['result']['samples'])
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        num = None
    if num == 0 or not files:
        return (f'no sensitivity sample was saved yet (cache: {cache_dir}); '
                'rerun the same command to start again')
    what = f'{num} sensitivity sample(s)' if num else \
        'the sensitivity samples taken so far'
    return (f'{what} are saved in {cache_dir}; rerun the same command to '
            'resume from them')


def older_caches(cache_dir: str, objective: str, estimator: str,
                 key: Dict[str, Any], optional: Sequence[str] = ()
                 ) -> List[str]:
    """Cache files of the same run written by an earlier release: the same
    objective, estimator, model, checkpoint and calibration set, but a key
    of another form (fewer or other settings, another version of the
    draws). Their samples are never read (the key differs); the caller says
    so, once, and that they can be deleted.

    Args:
        optional (Sequence[str]): Settings this release writes into a key
            only away from their defaults: a file that differs from ``key``
            only in those is another run's (e.g. with critical classes, in
            the same cache folder), not an earlier release's.

    Returns:
        list[str]: Their paths, sorted.
    """
    same = ('model', 'checkpoint', 'calibration')
    form = set(key['settings']) - set(optional)
    found = []
    pattern = osp.join(cache_dir, f'traces_{objective}_{estimator}_*.json')
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                old = json.load(f)['key']
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if old != key and all(old.get(k) == key.get(k) for k in same) and (
                set(old.get('settings', {})) - set(optional) != form
                or old.get('draws') != key.get('draws')):
            found.append(path)
    return found

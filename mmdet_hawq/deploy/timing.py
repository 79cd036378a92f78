"""Timing exported models side by side, and their memory in a fresh
process.

:func:`time_models` runs every model on the same images, interleaved image
by image with the order rotated, in rounds: a slow spell of a shared
machine slows them alike, and the spread of the round medians is the
run-to-run spread. :func:`measure_memory` loads one model and runs one image
in a fresh interpreter (``python -m mmdet_hawq.deploy.timing``) and reads its
peak resident memory.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ['MIB', 'Model', 'measure_memory', 'rss_bytes', 'time_models',
           'trim_heap']

MIB = 2**20

#: A model to time: (file, runtime, runtime options).
Model = Tuple[str, str, Mapping[str, Any]]


def rss_bytes() -> Dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of this process, in bytes."""
    out = {}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key in ('VmRSS', 'VmHWM'):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: the peak from getrusage only
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = dict(VmRSS=peak * 1024, VmHWM=peak * 1024)
    return out


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; else nothing)."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_models(models: Mapping[str, Model], images: Sequence[np.ndarray],
                threads: int, rounds: int, warmup: int
                ) -> Dict[str, Dict[str, Any]]:
    """Batch-1 latency of each model, interleaved image by image (the order
    rotated), ``rounds`` passes over ``images``.

    Args:
        models (Mapping[str, Model]): Name → (file, runtime, options).
        images (Sequence[np.ndarray]): (1, 3, H, W) float32 inputs.
        threads (int): Threads of one inference.
        rounds (int): Passes over the images.
        warmup (int): Untimed runs of each model first.

    Returns:
        dict: Name → ``median_ms``, ``min_ms``, ``round_medians_ms``,
        ``spread_ms`` (largest minus smallest round median),
        ``cpu_median_ms`` (this thread's CPU time) and ``runs``.
    """
    from .onnx_runtime import OnnxDetector
    loaded = {name: OnnxDetector(path, threads, runtime, **dict(options))
              for name, (path, runtime, options) in models.items()}
    names = list(loaded)
    for i in range(warmup):
        for name in names:
            loaded[name](images[i % len(images)])
    wall: Dict[str, List[List[float]]] = {n: [[] for _ in range(rounds)]
                                          for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i, image in enumerate(images):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                start, start_cpu = time.perf_counter(), time.thread_time()
                loaded[name](image)
                wall[name][r].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.thread_time() - start_cpu) * 1e3)
    out = {}
    for name in names:
        per_round = [statistics.median(w) for w in wall[name]]
        every = [t for w in wall[name] for t in w]
        out[name] = dict(
            median_ms=statistics.median(every), min_ms=min(every),
            round_medians_ms=per_round,
            spread_ms=max(per_round) - min(per_round),
            cpu_median_ms=statistics.median(cpu[name]), runs=len(every))
    return out


def measure_memory(path: str, runtime: str = 'onnxruntime',
                   threads: int = 1,
                   options: Optional[Mapping[str, Any]] = None
                   ) -> Dict[str, float]:
    """Resident memory of a fresh process that loads ``path`` on
    ``runtime`` and runs one image.

    Returns:
        dict: ``rss_load_mib`` (the load's increase),
        ``rss_after_first_image_mib`` and ``peak_mib`` (VmHWM).

    Raises:
        RuntimeError: The process failed (its last lines).
    """
    return run_worker(
        [sys.executable, '-m', 'mmdet_hawq.deploy.timing', path,
         '--runtime', runtime, '--threads', str(threads),
         '--options', json.dumps(dict(options or {}))],
        threads, f'memory of {path} on {runtime}')


def run_worker(cmd: Sequence[str], threads: int, what: str
               ) -> Dict[str, Any]:
    """Run ``cmd`` in a fresh process at ``threads`` OpenMP threads; the
    last JSON line it printed.

    Raises:
        RuntimeError: The process failed or printed no JSON line (``what``
            and its last lines).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f'{what} failed (exit {proc.returncode}): '
                           f'{" | ".join(tail)}')
    return json.loads(lines[-1])


def _memory_worker() -> int:
    """In this fresh process: load one model, run one image, print one
    JSON line (:func:`measure_memory`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument('model')
    parser.add_argument('--runtime', default='onnxruntime')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--options', default='{}')
    args = parser.parse_args()
    from .onnx_runtime import OnnxDetector
    before = rss_bytes()
    detector = OnnxDetector(args.model, args.threads, args.runtime,
                            **json.loads(args.options))
    trim_heap()
    loaded = rss_bytes()
    h, w = detector.input_shape
    detector(np.random.default_rng(0).uniform(0, 255, (1, 3, h, w)))
    end = rss_bytes()
    print(json.dumps(dict(
        rss_load_mib=(loaded['VmRSS'] - before['VmRSS']) / MIB,
        rss_after_first_image_mib=end['VmRSS'] / MIB,
        peak_mib=end['VmHWM'] / MIB)))
    return 0


if __name__ == '__main__':
    sys.exit(_memory_worker())

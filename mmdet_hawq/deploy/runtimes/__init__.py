"""The runtimes an exported detector runs on, behind one interface.

:func:`make_session` opens a ``.onnx`` file (or, for OpenVINO, an IR
``.xml``, e.g. NNCF's output) on ONNX Runtime or OpenVINO, on the CPU, with a
set number of threads. Every :class:`~.base.Session` runs one (1, 3, H, W)
float image and returns the model's outputs, and tells which precision its
convolutions and matrix products actually execute in
(:meth:`~.base.Session.kernel_precisions`), read from what the runtime
itself compiled: ONNX Runtime's optimised graph, OpenVINO's runtime model.

``onnxruntime`` is a dependency; ``openvino`` is the optional extra
``pip install -e .[openvino]`` (:func:`runtime_missing` says whether it is
there).
"""
import importlib.util
from typing import Any, Optional

from ...errors import HawqUserError
from .base import KERNEL_KINDS, Session

__all__ = ['KERNEL_KINDS', 'RUNTIMES', 'Session', 'make_session',
           'runtime_missing']

#: Runtime name → the Python package it needs.
RUNTIMES = {'onnxruntime': 'onnxruntime', 'openvino': 'openvino'}


def runtime_missing(runtime: str) -> Optional[str]:
    """Why ``runtime`` cannot run here (its package is not installed), or
    None when it can."""
    if runtime not in RUNTIMES:
        return f'unknown runtime {runtime!r} (known: {", ".join(RUNTIMES)})'
    if importlib.util.find_spec(RUNTIMES[runtime]) is None:
        return (f'{RUNTIMES[runtime]} is not installed: pip install -e '
                '.[openvino]')
    return None


def make_session(model_file: str, runtime: str = 'onnxruntime',
                 threads: int = 1, **options: Any) -> Session:
    """Open ``model_file`` on ``runtime`` (CPU).

    Args:
        model_file (str): A ``.onnx`` file (any runtime) or an OpenVINO IR
            ``.xml``.
        runtime (str): ``'onnxruntime'`` or ``'openvino'``. Defaults to
            ``'onnxruntime'``.
        threads (int): Threads of one inference. Defaults to 1.
        **options: The runtime's own settings (see
            :class:`~.onnxruntime_session.OrtSession` and
            :class:`~.openvino_session.OpenVinoSession`).

    Returns:
        Session: The session.

    Raises:
        HawqUserError: The runtime is unknown or not installed, or the file
            is missing or not a model it can load.
    """
    missing = runtime_missing(runtime)
    if missing:
        raise HawqUserError(f'--runtime {runtime}: {missing}')
    if runtime == 'openvino':
        from .openvino_session import OpenVinoSession
        return OpenVinoSession(model_file, threads, **options)
    from .onnxruntime_session import OrtSession
    return OrtSession(model_file, threads, **options)

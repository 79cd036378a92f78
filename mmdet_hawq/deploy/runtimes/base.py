"""What every runtime session offers (:class:`Session`)."""
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ...errors import HawqUserError

__all__ = ['KERNEL_KINDS', 'Session', 'check_model_file', 'load_error']

#: The kinds of compute kernel :meth:`Session.kernel_precisions` counts.
KERNEL_KINDS = ('Convolution', 'MatMul')


def check_model_file(model_file: str) -> None:
    """One line when ``model_file`` does not exist."""
    if not osp.isfile(model_file):
        raise HawqUserError(
            f'model {model_file!r} does not exist: pass a file written by '
            'tools/export_onnx.py (or an OpenVINO .xml)')


def load_error(runtime: str, model_file: str, err: Exception
               ) -> HawqUserError:
    """The one line for a model the runtime cannot load or compile."""
    first = str(err).strip().splitlines()
    first = ' '.join(ln.strip() for ln in first[-2:])[:300] if first else ''
    return HawqUserError(
        f'{runtime} cannot load {model_file!r} ({type(err).__name__}: '
        f'{first}): pass a model written by tools/export_onnx.py')


class Session:
    """A model opened on a runtime: one image in, its outputs out.

    Attributes:
        runtime (str): The runtime's name.
        model_file (str): The file it was opened from.
        threads (int): Threads of one inference.
        input_name (str): The image input's name.
        input_count (int): How many inputs the model has.
        input_shape (tuple[int, ...]): The first input's shape (-1 where
            dynamic).
        output_names (list[str]): The outputs, in order.
    """

    runtime = ''

    def __init__(self, model_file: str, threads: int) -> None:
        self.model_file = model_file
        self.threads = threads
        self.input_name = ''
        self.input_count = 0
        self.input_shape: Tuple[int, ...] = ()
        self.output_names: List[str] = []

    def run(self, image: np.ndarray) -> List[np.ndarray]:
        """The outputs for one input.

        Args:
            image (np.ndarray): The input, float32, of :attr:`input_shape`.

        Returns:
            list[np.ndarray]: The outputs, in :attr:`output_names`' order.
        """
        raise NotImplementedError

    def kernel_precisions(self) -> Dict[str, int]:
        """How many convolutions and matrix products execute in which
        precision, read from what the runtime compiled.

        Returns:
            dict[str, int]: ``'<kind>/<precision>'`` → count, kind one of
            :data:`KERNEL_KINDS`, precision ``int8``, ``int4``, ``f32`` or
            ``bf16``.
        """
        raise NotImplementedError


def count_kernels(pairs: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    """``(kind, precision)`` pairs → sorted ``'kind/precision'`` counts."""
    counts: Dict[str, int] = {}
    for kind, precision in pairs:
        key = f'{kind}/{precision}'
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))

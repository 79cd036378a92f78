"""Starting a distributed run beside mmengine's launcher.

:func:`init_cpu_process_group` starts a gloo group for ``torchrun`` on
machines without CUDA (mmengine's pytorch launcher calls
``torch.cuda.set_device``, which a CPU build of torch cannot do). The
collectives of the run itself are in :mod:`mmdet_hawq.api.dist`; every one
has a timeout, so a rank that dies or hangs makes the others stop with
:class:`~mmdet_hawq.errors.HawqUserError` instead of waiting for ever.
"""
import datetime
import os

import torch.distributed as torch_dist

from ..errors import HawqUserError

#: Seconds a collective waits for the slowest rank before the run stops
#: with an error (a dead or stuck rank). Sensitivity samples and COCO
#: evaluation on rank 0 take minutes, never this long.
DEFAULT_TIMEOUT_S = 1800


def init_cpu_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Start the gloo process group of a ``torchrun`` job on CPUs.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from
    the environment, as mmengine's pytorch launcher does. Does nothing if
    the group exists.

    Args:
        timeout_s (float): Collective timeout in seconds. Defaults to
            :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        HawqUserError: Not started by ``torchrun`` (no ``RANK``).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                           'MASTER_PORT') if k not in os.environ]
    if missing:
        raise HawqUserError(
            f'--launcher pytorch without {", ".join(missing)} in the '
            'environment: start the job with torchrun (tools/dist_ptq.sh '
            'CONFIG N) or drop --launcher')
    torch_dist.init_process_group(
        backend='gloo', timeout=datetime.timedelta(seconds=timeout_s))

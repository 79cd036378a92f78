"""Collectives of a distributed quantization run, on mmengine's process
group (one process: plain calls).

* :func:`process_shard` — this rank's share of the calibration batches and
  the all-reduce that adds the partial trace sums
  (:class:`~mmdet_hawq.sensitivity.Shard`);
* :func:`run_on_main` runs a step (the ILP, a cache read) on rank 0 and
  gives its result — or its error — to every rank, so all ranks apply the
  same plan or stop with the same message.

A failed collective (timeout, peer gone) stops with
:class:`~mmdet_hawq.errors.HawqUserError` instead of waiting for ever.
"""
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from mmengine import dist

from ..errors import HawqUserError
from ..sensitivity import Shard


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (timeout, peer gone) into one clear error.
    """
    try:
        yield
    except (RuntimeError, OSError) as err:
        rank, world_size = dist.get_dist_info()
        raise HawqUserError(
            f'rank {rank} of {world_size}: {what} failed ({str(err)[:200]}):'
            ' another process died or did not answer within the collective '
            'timeout; see its log (raise --dist-timeout if it is only slow)'
        ) from None


def _all_reduce_sum(partial: torch.Tensor) -> torch.Tensor:
    total = partial.clone()
    with collective('summing the trace samples'):
        dist.all_reduce(total, op='sum')  # moved to the backend's device
    return total


def process_shard() -> Shard:
    """The :class:`~mmdet_hawq.sensitivity.Shard` of this process in
    mmengine's process group (one process: the whole set)."""
    rank, world_size = dist.get_dist_info()
    if world_size == 1:
        return Shard()
    return Shard(rank, world_size, _all_reduce_sum)


def run_on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0; its result on every rank.

    An exception raised on rank 0 is raised on every rank, so no rank is
    left waiting for a result that never comes.

    Args:
        fn (Callable): The step, e.g. the ILP. Only rank 0 calls it.

    Returns:
        Any: What ``fn`` returned on rank 0 (a picklable object).
    """
    rank, world_size = dist.get_dist_info()
    if world_size == 1:
        return fn(*args, **kwargs)
    box = [None]
    if rank == 0:
        try:
            box[0] = ('ok', fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - re-raised on every rank
            box[0] = ('error', err)
    with collective(f'receiving the result of {fn.__name__} from rank 0'):
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == 'error':
        raise value
    return value

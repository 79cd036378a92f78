"""Teacher and student queries that correspond: the student's query
selection replays the teacher's.

Two-stage detectors choose their decoder queries from the encoder's tokens
(DINO and two-stage Deformable DETR by ``torch.topk`` of the proposal
scores; DDQ-DETR by NMS, and NMS again between decoder layers). A quantized
student scores the tokens slightly differently, picks another top-k in
another order, and a distillation loss that compares queries by index then
measures the reordering, not the damage. :func:`shared_selection` records
every selection the teacher makes during a forward pass and makes the
student's forward return the same indices, so that query ``q`` of the
student is the same proposal as query ``q`` of the teacher (its content
and box still come from the student's own weights).
"""
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import torch

#: A selection function to share: (the module or namespace that holds it,
#: its attribute name, how its indices are replayed).
SelectionOp = Tuple[Any, str, Callable[..., Any]]


def topk_from(indices: torch.Tensor, input: torch.Tensor, k: int,
              dim: int = -1, *args: Any, **kwargs: Any) -> Any:
    """``torch.topk``'s result for given ``indices`` (B, k): the values
    of ``input`` at them, and the indices."""
    values = input.gather(dim, indices)
    return torch.return_types.topk((values, indices))


def batched_nms_from(keep: torch.Tensor, boxes: torch.Tensor,
                     scores: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """mmcv ``batched_nms``'s result for given ``keep`` indices (K, ):
    ``(dets (K, 5), keep)``."""
    return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep


def _indices(result: Any) -> torch.Tensor:
    """The indices of a selection's result (``topk`` or ``(dets, keep)``).
    """
    return result.indices if hasattr(result, 'indices') else result[1]


@contextmanager
def shared_selection(ops: Sequence[SelectionOp], record: List[Any],
                     replay: bool) -> Iterator[None]:
    """Inside the block, every call of ``ops`` is recorded (the teacher) or
    replayed (the student).

    Args:
        ops (Sequence[SelectionOp]): The selection functions of the model's
            family (:meth:`~.base.DetrAdapter.selection_ops`).
        record (list): ``(op name, indices)`` per call, in call order:
            filled when recording, read when replaying.
        replay (bool): Replay ``record`` instead of recording into it.

    Raises:
        RuntimeError: The student calls the selections in another order or
            number than the teacher did (a bug: the control flow does not
            depend on the scores).
    """
    saved = [(holder, name, getattr(holder, name)) for holder, name, _ in ops]
    calls = iter(list(record)) if replay else None
    if not replay:
        record.clear()

    def patched(name: str, original: Callable[..., Any],
                rebuild: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not replay:
                result = original(*args, **kwargs)
                record.append((name, _indices(result).detach()))
                return result
            recorded = next(calls, None)
            if recorded is None or recorded[0] != name:
                raise RuntimeError(
                    f'the student called {name} where the teacher called '
                    f'{recorded[0] if recorded else "nothing"}: its query '
                    "selection cannot replay the teacher's")
            return rebuild(recorded[1], *args, **kwargs)
        return call

    for (holder, name, original), (_, _, rebuild) in zip(saved, ops):
        setattr(holder, name, patched(name, original, rebuild))
    try:
        yield
    finally:
        for holder, name, original in saved:
            setattr(holder, name, original)

"""The public per-family calls, each answered by the model's family adapter
(:mod:`.adapters`): the rest of the package asks these, never the model's
head or layers by name."""
from contextlib import ExitStack, contextmanager, nullcontext
from typing import (Any, ContextManager, Dict, Iterator, List, Sequence,
                    Tuple, Union)

import torch
import torch.nn as nn

from .adapters import ADAPTERS, DetrAdapter, adapter_of, find_adapter
from .adapters.base import Batch, Group

#: Default (λ_KL, T) of the distillation loss by class activation: the
#: paper's values for softmax. For sigmoid heads T in {1, 2, 6} was measured
#: on the small DINO (docs: 'Temperature and λ_KL for sigmoid heads'): the
#: same 4-bit mAP, 3-bit 30.7-32.6; λ_KL only scales Gauss-Newton traces, so
#: it cannot change their plans.
DISTILLATION_DEFAULTS = {'softmax': (0.05, 6.0), 'sigmoid': (0.05, 6.0)}


def detector_family(model: Union[nn.Module, type]) -> DetrAdapter:
    """The adapter of ``model``'s family (``.name``, ``.detector``,
    ``.loss_needs_training_flag``, ``.loss_note`` and its calls).

    Args:
        model (nn.Module | type): A detector, or its class.

    Raises:
        HawqUserError: The detector is not a supported DETR-family type.
    """
    return adapter_of(model)


def detection_head(model: nn.Module) -> nn.Module:
    """The detector's head (its final class/box FFNs, post-processing)."""
    return adapter_of(model).head(model)


def class_activation(model: nn.Module) -> str:
    """``'sigmoid'`` for a per-class sigmoid/focal head, else ``'softmax'``.
    """
    return adapter_of(model).class_activation(model)


def float_weights(model: nn.Module) -> Dict[int, str]:
    """``id(parameter)`` → why it stays float, for the weights that stay
    float by structure (the head's final class/box FFNs, and any other
    branch the family keeps float); none for a module that is not a
    supported detector (e.g. layers quantized on their own)."""
    adapter = find_adapter(model)
    return {} if adapter is None else adapter.float_weights(model)


def default_min_bits(model: nn.Module) -> Dict[str, int]:
    """Per-weight floors found from the model's structure (e.g. the
    deformable-attention floors; empty for DETR, Conditional and DAB-DETR).

    Returns:
        dict[str, int]: Weight name → fewest bits.
    """
    return adapter_of(model).default_min_bits(model)


def decoder_outputs(model: nn.Module, batch: Batch) -> Group:
    """Class scores (L, B, Q, C) and normalised (cx, cy, w, h) boxes
    (L, B, Q, 4) of every decoder layer, in eval tensor mode (C =
    num_classes + 1 for a softmax head, num_classes for a sigmoid one).

    Raises:
        HawqUserError: The head does not return per-layer outputs.
    """
    return adapter_of(model).decoder_outputs(model, batch)


def distillation_outputs(model: nn.Module, batch: Batch) -> List[Group]:
    """Every ``(scores, boxes)`` group the distillation loss compares: the
    decoder's, and a two-stage model's encoder proposals over all tokens
    (1, B, N, C) and (1, B, N, 4)."""
    return adapter_of(model).distillation_outputs(model, batch)


def proposal_branches(model: nn.Module
                      ) -> Union[None, Tuple[nn.Module, nn.Module]]:
    """The encoder proposal class and box branches of a two-stage model,
    or None."""
    return adapter_of(model).proposal_branches(model)


def onnx_outputs(model: nn.Module, batch: Batch) -> Group:
    """The (L, B, Q, C) scores and (L, B, Q, 4) boxes an ONNX export of
    ``model`` computes (the input of :func:`predict_from_outputs`)."""
    return adapter_of(model).onnx_outputs(model, batch)


def predict_from_outputs(model: nn.Module, scores: torch.Tensor,
                         boxes: torch.Tensor, metas: Sequence[dict],
                         rescale: bool = True) -> list:
    """Detections (one ``InstanceData`` per image) from
    :func:`onnx_outputs` by the head's post-processing."""
    return adapter_of(model).predict(model, scores, boxes, metas, rescale)


@contextmanager
def double_backward_swaps() -> Iterator[None]:
    """Every family's kernel swaps for double backward (e.g. the
    gather-based deformable attention), each entered once."""
    swaps = list(dict.fromkeys(k for a in ADAPTERS
                               for k in a.double_backward_kernels))
    with ExitStack() as stack:
        for swap in swaps:
            stack.enter_context(swap())
        yield


def same_queries(model: nn.Module, record: List[Any],
                 replay: bool) -> ContextManager[None]:
    """Inside the block, ``model``'s query selections are recorded into
    ``record`` (a teacher) or replay it (a student), so that the student's
    queries are the teacher's proposals (two-stage detectors; nothing
    happens for the others or a module of no supported family)."""
    adapter = find_adapter(model)
    return nullcontext() if adapter is None else \
        adapter.same_queries(model, record, replay)


def shares_queries(model: nn.Module) -> bool:
    """Whether :func:`same_queries` changes anything for ``model``."""
    adapter = find_adapter(model)
    return adapter is not None and bool(adapter.selection_ops(model))

"""Does a weight with a zero trace change the outputs? (gradient blind spots)

A trace of exactly 0 has two causes that the Hessian cannot tell apart:

* the weight provably does not matter: its input is always zero (the
  content projections of Conditional and DAB-DETR's first decoder layer see
  all-zero content queries), or it is used only in training (DINO's
  denoising label embedding);
* the weight matters but has no gradient path: in eval mode two-stage
  Deformable DETR and DINO pass the encoder proposals through a top-k
  selection and detached reference points, so ``memory_trans_fc`` changes
  which queries the decoder sees without ever receiving a gradient.

:func:`output_influence` tells them apart directly: it replaces one weight
at a time by a perturbed copy (its lowest-bit quantization) and measures the
largest change of the model's outputs on a few calibration batches. Zero
means no influence; anything else is a blind spot, which the allocation
must not send to the lowest bit-width because of its zero trace.
"""
from typing import Callable, Dict, Mapping, Sequence

import torch

OutputsFn = Callable[[torch.nn.Module, Dict], Sequence[torch.Tensor]]


@torch.no_grad()
def output_influence(model: torch.nn.Module,
                     params: Mapping[str, torch.nn.Parameter],
                     outputs: OutputsFn, batches: Sequence[Dict],
                     perturb: Callable[[torch.Tensor], torch.Tensor]
                     ) -> Dict[str, float]:
    """Largest absolute output change when each weight alone is perturbed.

    Args:
        model (nn.Module): The model; run in eval mode (no dropout, no
            batch-norm updates), its mode and weights restored on exit.
        params (Mapping[str, Parameter]): The weights to test, by name.
        outputs (Callable): ``(model, batch) → tensors`` compared, e.g. every
            decoder layer's (scores, boxes).
        batches (Sequence[dict]): A few calibration batches.
        perturb (Callable): ``weight → perturbed weight`` (same shape).

    Returns:
        dict[str, float]: Name → ``max |Δ output|`` over the batches; exactly
        0.0 for a weight that does not influence the outputs.
    """
    was_training = model.training
    model.eval()
    try:
        reference = [[t.clone() for t in outputs(model, b)] for b in batches]
        influence = {}
        for name, param in params.items():
            saved = param.detach().clone()
            param.copy_(perturb(saved))
            try:
                diff = 0.0
                for batch, ref in zip(batches, reference):
                    for out, r in zip(outputs(model, batch), ref):
                        diff = max(diff, float((out - r).abs().max()))
            finally:
                param.copy_(saved)
            influence[name] = diff
    finally:
        model.train(was_training)
    return influence

"""Packed checkpoints of the tiny DETR (and DINO) for the deployment tests:
a mixed plan with every bit-width 2-8 and one weight left in float."""
import copy
from typing import Dict, Optional

import pytest
import torch

from mmdet_hawq.quant import (apply_plan, make_plan, pack_state_dict,
                              quantizable_weights)

from ..conftest import build_from

#: Bit-widths given to the quantizable weights in turn; None stays float.
CYCLE = (3, 4, 5, 8, 2, 6, 7, None)


def mixed_plan(model: torch.nn.Module) -> Dict[str, Optional[int]]:
    names = list(quantizable_weights(model))
    return {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}


def make_packed(cfg, plan_fn=mixed_plan, axis=None, path=None) -> dict:
    """Quantize the config's model by ``plan_fn``; returns the float state,
    the plan, the packed checkpoint (saved to ``path`` when given)."""
    model = build_from(cfg)
    float_state = copy.deepcopy(model.state_dict())
    plan = plan_fn(model)
    entries = make_plan(plan, axis)
    quantized = apply_plan(model, entries).applied
    packed = pack_state_dict(model, quantized, entries)
    if path is not None:
        torch.save(packed, str(path))
    return dict(float_state=float_state, plan=plan, packed=packed,
                path=None if path is None else str(path))


@pytest.fixture(scope='session')
def tiny_packed(tiny_cfg, tmp_path_factory):
    """The tiny DETR quantized with :func:`mixed_plan`, saved."""
    path = tmp_path_factory.mktemp('packed') / 'packed.pth'
    return make_packed(tiny_cfg, path=path)

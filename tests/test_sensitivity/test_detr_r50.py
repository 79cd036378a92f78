"""All three objectives and both estimators run through the full-size
DETR-R50 architecture of mmdet's config (random weights, one small image)."""
import copy
import os.path as osp

import torch
from mmengine.config import Config

from mmdet.registry import MODELS
from mmdet_hawq.quant import apply_plan, quantizable_weights, uniform_plan
from mmdet_hawq.sensitivity import (DetrLossObjective, DistillationObjective,
                                    gauss_newton_traces, hessian_mode,
                                    hutchinson_traces, preprocess_batches)

from ..conftest import ROOT


def test_detr_r50_all_metrics(tiny_cfg):
    from mmdet_hawq.api import CalibrationSettings
    from mmdet_hawq.engine.calibration import build_calibration
    cfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_',
                                   'detr_r50_hawq.py'))
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(cfg.model)).eval()
    loader, _ = build_calibration(tiny_cfg, CalibrationSettings(
        num_images=1, batch_size=1))
    batches = preprocess_batches(model, loader)
    weights = quantizable_weights(model)
    assert len(weights) > 100  # ~130 weights in DETR-R50
    teacher = copy.deepcopy(model)
    idx = range(len(batches))
    with hessian_mode(model, weights):
        loss_obj = DetrLossObjective(model, batches)
        res = hutchinson_traces(weights, loss_obj.loss, idx, tol=0.0,
                                max_samples=1, min_samples=1)
        assert torch.isfinite(torch.tensor(res.samples)).all()
        dist = DistillationObjective(model, teacher, batches, weights)
        assert dist.loss(0).item() == 0.0  # outfloat: student == teacher
        res = gauss_newton_traces(weights, dist.gauss_newton_sample, idx,
                                  tol=0.0, max_samples=1, min_samples=1)
        assert (torch.tensor(res.samples) >= 0).all()
    apply_plan(model, uniform_plan(weights, 8))  # outquant student
    with hessian_mode(model, weights):
        dist = DistillationObjective(model, teacher, batches, weights)
        assert dist.loss(0).item() > 0.0
        res = hutchinson_traces(weights, dist.loss, idx, tol=0.0,
                                max_samples=1, min_samples=1)
        assert torch.isfinite(torch.tensor(res.samples)).all()

"""CPU against CUDA, on every DETR-family member shrunk (marked ``cuda``;
skipped without a GPU; ``tools/gpu_check.sh`` runs them on a lent one).

* The estimators' arithmetic with the same draws: loss, gradient and
  Hessian-vector product (double backward through deformable attention
  included) agree to float32 round-off.
* The hook end to end in mmengine's Runner on each device: the CUDA run
  writes a packed checkpoint that loads on the CPU bit for bit, and its
  traces (its own draws) agree with the CPU run's within their standard
  errors.
"""
import copy
import glob
import json
import os.path as osp
from typing import Dict, List
from unittest import mock

import numpy as np
import pytest
import torch
from mmengine.runner import Runner

from mmdet_hawq.models import class_activation
from mmdet_hawq.quant import (quantizable_weights, quantize_weights_,
                              uniform_plan)
from mmdet_hawq.quant.packing import unpack_checkpoint
from mmdet_hawq.sensitivity import (DistillationObjective, batch_dots,
                                    hessian_mode)
from ..conftest import FAMILY_CONFIGS, build_from, requires_cuda
from .test_family_hook import batches_of

pytestmark = [pytest.mark.cuda, requires_cuda]
FAMILIES = sorted(FAMILY_CONFIGS)
#: Members run through the hook on both devices: the deformable-attention
#: users (the plain-attention members share DETR's code paths, which the
#: main job's GPU run in tools/gpu_check.sh covers).
HOOK_FAMILIES = ('deformable_twostage', 'dino')


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in cuDNN convolutions while devices are compared."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def moved(batch: Dict, device: str) -> Dict:
    return dict(inputs=batch['inputs'].to(device),
                data_samples=[s.to(device) for s in batch['data_samples']])


def objective_on(model, batches, device: str):
    """The 8-bit student's distillation objective with ``model`` on
    ``device``."""
    model = copy.deepcopy(model).to(device)
    teacher = copy.deepcopy(model)
    weights = quantizable_weights(model)
    quantize_weights_(weights, uniform_plan(weights, 8))
    obj = DistillationObjective(model, teacher,
                                [moved(b, device) for b in batches], weights,
                                activation=class_activation(model))
    return model, weights, obj


@pytest.mark.parametrize('name', FAMILIES)
def test_loss_gradient_and_hvp_match_cpu(family_cfg, name):
    cfg = family_cfg(name)
    model = build_from(cfg)
    batches = batches_of(model, cfg)
    gen = torch.Generator().manual_seed(0)
    found = {}
    for device in ('cpu', 'cuda'):
        student, weights, obj = objective_on(model, batches, device)
        plist = list(weights.values())
        # the same ±1 probe on both devices (drawn on the host)
        probe = [(torch.randint(0, 2, p.shape, generator=gen.manual_seed(i))
                  * 2 - 1).to(device, p.dtype) for i, p in enumerate(plist)]
        with hessian_mode(student, weights):
            loss = obj.loss(0)
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            dots = batch_dots(plist, obj.loss, [0, 1], [0, 1], probe,
                              list(weights))
        found[device] = dict(
            loss=loss.item(), dots=dots.cpu().numpy(),
            grads=[None if g is None else g.cpu() for g in grads])
    cpu, gpu = found['cpu'], found['cuda']
    assert gpu['loss'] == pytest.approx(cpu['loss'], rel=1e-3, abs=1e-7)
    for a, b in zip(cpu['grads'], gpu['grads']):
        assert (a is None) == (b is None)
        if a is not None:
            scale = a.abs().max().clamp_min(1e-12)
            assert float((a - b).abs().max() / scale) < 1e-2
    scale = np.abs(cpu['dots']).max()
    assert np.abs(cpu['dots'] - gpu['dots']).max() <= 1e-2 * scale


def run_hook(cfg, work_dir: str, device: str, metric: str,
             samples: int) -> Dict:
    """The hook through mmengine's Runner with the model on ``device``:
    its traces (mean, SE), plan, summary and the test metrics."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric=metric, target_bits=4,
        bit_range=(3, 6), save_packed=True, sensitivity=dict(
            num_images=4, batch_size=2, tol=0.0, min_samples=samples,
            max_samples=samples))]
    with mock.patch('mmengine.runner.runner.get_device',
                    return_value=device):
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
    model = runner.model
    assert next(model.parameters()).device.type == device
    out = osp.join(work_dir, 'hawq')
    (cache, ) = glob.glob(osp.join(out, 'cache', 'traces_*.json'))
    samples_ = np.asarray(json.load(open(cache))['result']['samples'])
    return dict(
        mean=samples_.mean(0), se=samples_.std(0, ddof=1) /
        np.sqrt(len(samples_)), plan=json.load(open(osp.join(out,
                                                             'plan.json'))),
        summary=json.load(open(osp.join(out, 'summary.json'))),
        metrics=metrics, state={k: v.detach().cpu() for k, v in
                                model.state_dict().items()},
        packed=osp.join(out, 'packed.pth'))


def within_se(cpu: Dict, gpu: Dict, z: float = 3.0) -> List[bool]:
    se = np.sqrt(cpu['se']**2 + gpu['se']**2)
    diff = np.abs(cpu['mean'] - gpu['mean'])
    return list(diff <= z * se + 1e-6 * np.abs(cpu['mean']) + 1e-30)


@pytest.mark.parametrize('name', HOOK_FAMILIES)
def test_hook_on_cuda_matches_cpu(family_cfg, tmp_path, name):
    cfg = family_cfg(name)
    cpu = run_hook(cfg, str(tmp_path / 'cpu'), 'cpu', 'outquant', 6)
    gpu = run_hook(cfg, str(tmp_path / 'cuda'), 'cuda', 'outquant', 6)
    ok = within_se(cpu, gpu)
    assert np.mean(ok) >= 0.9, (
        f'{sum(not x for x in ok)} of {len(ok)} layers beyond 3 SE')
    assert set(gpu['plan']) == set(cpu['plan'])
    assert gpu['summary']['avg_bits'] <= 4 + 1e-9
    differ = [n for n in cpu['plan'] if cpu['plan'][n] != gpu['plan'][n]]
    print(f'{name}: {len(differ)} of {len(cpu["plan"])} layers planned '
          'differently (independent draws), mAP cpu '
          f"{cpu['metrics']['coco/bbox_mAP']} cuda "
          f"{gpu['metrics']['coco/bbox_mAP']}")
    # the packed checkpoint written on the GPU loads on the CPU, bit for bit
    packed = torch.load(gpu['packed'], map_location='cpu',
                        weights_only=False)
    for part in ('state_dict', 'packed'):
        for entry in packed[part].values():
            tensors = [entry] if torch.is_tensor(entry) else [
                v for v in entry.values() if torch.is_tensor(v)]
            assert all(t.device.type == 'cpu' for t in tensors)
    state = unpack_checkpoint(packed)['state_dict']
    for k, v in state.items():
        assert torch.equal(v, gpu['state'][k].to(v.dtype)), k


@pytest.mark.parametrize('name', ['deformable_twostage', 'dino'])
def test_loss_sensitivity_through_deformable_attention_on_cuda(
        family_cfg, tmp_path, name):
    """Hutchinson's double backward through deformable attention on CUDA
    (it failed in grid_sample's backward before)."""
    gpu = run_hook(family_cfg(name), str(tmp_path), 'cuda', 'losssen', 2)
    assert np.isfinite(gpu['mean']).all() and np.abs(gpu['mean']).max() > 0
    assert gpu['summary']['avg_bits'] <= 4 + 1e-9

"""CPU against CUDA, on every DETR-family member shrunk (marked ``cuda``;
skipped without a GPU; ``release/gpu_check.sh`` runs them on a lent one, and
``pytest -m cuda --gpu-device cpu`` dry-runs them here, the CPU against
itself, so that the tests themselves do not rot unrun).

* The estimators' arithmetic with the same draws: loss, gradient and
  Hessian-vector product (double backward through deformable attention
  included) agree to float32 round-off.
* The hook end to end in mmengine's Runner on each device: the GPU run
  writes a packed checkpoint that loads on the CPU bit for bit, and its
  traces (its own draws) agree with the CPU run's within their standard
  errors.
* GPTQ rounding and W4A8 activation quantization through the hook: the
  GPU's codes, activation ranges and activation traces agree with the
  CPU's, and the model that lives on the GPU exports the same ONNX file as
  its CPU copy.
* Sharded traces over two processes with the weights on the GPU equal one
  process's.
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
from ..conftest import FAMILY_CONFIGS, build_from
from .test_process_group import check_sharded_traces
from .test_family_hook import batches_of

pytestmark = pytest.mark.cuda
FAMILIES = sorted(FAMILY_CONFIGS)
#: Members whose GPTQ and activation runs are compared: a plain-attention
#: member, a deformable one and DDQ-DETR (its own query selection).
ACTIVATION_FAMILIES = ('conditional', 'ddq', 'dino')


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in cuDNN convolutions or matmuls while devices are
    compared."""
    saved = (torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


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
def test_loss_gradient_and_hvp_match_cpu(family_cfg, gpu_device, name):
    cfg = family_cfg(name)
    model = build_from(cfg)
    batches = batches_of(model, cfg)
    gen = torch.Generator().manual_seed(0)
    found = {}
    for device in ('cpu', gpu_device):
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
    cpu, gpu = found['cpu'], found[gpu_device]
    assert gpu['loss'] == pytest.approx(cpu['loss'], rel=1e-3, abs=1e-7)
    for a, b in zip(cpu['grads'], gpu['grads']):
        assert (a is None) == (b is None)
        if a is not None:
            scale = a.abs().max().clamp_min(1e-12)
            assert float((a - b).abs().max() / scale) < 1e-2
    scale = np.abs(cpu['dots']).max()
    assert np.abs(cpu['dots'] - gpu['dots']).max() <= 1e-2 * scale


def run_hook(cfg, work_dir: str, device: str, **settings) -> Dict:
    """The hook with ``settings`` through mmengine's Runner with the model
    on ``device``: its outputs, the test metrics and the quantized
    weights."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', save_packed=True,
                             **settings)]
    with mock.patch('mmengine.runner.runner.get_device',
                    return_value=device):
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
    model = runner.model
    assert next(model.parameters()).device.type == \
        torch.device(device).type
    out = osp.join(work_dir, 'hawq')

    def read(name: str):
        path = osp.join(out, name)
        return json.load(open(path)) if osp.exists(path) else None

    return dict(out=out, plan=read('plan.json'),
                summary=read('summary.json'),
                ranges=read('activations.json'),
                sites=read('activation_sites.json'), metrics=metrics,
                state={k: v.detach().cpu() for k, v in
                       model.state_dict().items()},
                packed=osp.join(out, 'packed.pth'))


def cached_traces(run: Dict) -> Dict:
    """The weights' trace samples of a run (its cache): mean and SE."""
    (cache, ) = glob.glob(osp.join(run['out'], 'cache', 'traces_*.json'))
    samples = np.asarray(json.load(open(cache))['result']['samples'])
    return dict(mean=samples.mean(0),
                se=samples.std(0, ddof=1) / np.sqrt(len(samples)))


def within_se(cpu: Dict, gpu: Dict, z: float = 3.0) -> List[bool]:
    """Per column: the two means agree within ``z`` combined SEs."""
    cpu_mean, gpu_mean = np.asarray(cpu['mean']), np.asarray(gpu['mean'])
    se = np.sqrt(np.asarray(cpu['se'])**2 + np.asarray(gpu['se'])**2)
    diff = np.abs(cpu_mean - gpu_mean)
    return list(diff <= z * se + 1e-6 * np.abs(cpu_mean) + 1e-30)


def check_packed_loads_on_cpu(run: Dict) -> None:
    """The packed checkpoint written on the device holds host tensors and
    unpacks on the CPU to the run's model, bit for bit."""
    packed = torch.load(run['packed'], map_location='cpu',
                        weights_only=False)
    for part in ('state_dict', 'packed'):
        for entry in packed[part].values():
            tensors = [entry] if torch.is_tensor(entry) else [
                v for v in entry.values() if torch.is_tensor(v)]
            assert all(t.device.type == 'cpu' for t in tensors)
    state = unpack_checkpoint(packed)['state_dict']
    for k, v in state.items():
        assert torch.equal(v, run['state'][k].to(v.dtype)), k


@pytest.mark.parametrize('name', FAMILIES)
def test_hook_on_gpu_matches_cpu(family_cfg, tmp_path, gpu_device, name):
    cfg = family_cfg(name)
    settings = dict(metric='outquant', target_bits=4, bit_range=(3, 6),
                    calibration=dict(num_images=4, batch_size=2),
                    sensitivity=dict(tol=0.0, min_samples=6, max_samples=6))
    cpu = run_hook(cfg, str(tmp_path / 'cpu'), 'cpu', **settings)
    gpu = run_hook(cfg, str(tmp_path / 'gpu'), gpu_device, **settings)
    ok = within_se(cached_traces(cpu), cached_traces(gpu))
    assert np.mean(ok) >= 0.9, (
        f'{sum(not x for x in ok)} of {len(ok)} layers beyond 3 SE')
    assert set(gpu['plan']) == set(cpu['plan'])
    assert gpu['summary']['avg_bits'] <= 4 + 1e-9
    differ = [n for n in cpu['plan'] if cpu['plan'][n] != gpu['plan'][n]]
    print(f'{name}: {len(differ)} of {len(cpu["plan"])} layers planned '
          'differently (independent draws), mAP cpu '
          f"{cpu['metrics']['coco/bbox_mAP']} {gpu_device} "
          f"{gpu['metrics']['coco/bbox_mAP']}")
    check_packed_loads_on_cpu(gpu)


@pytest.mark.parametrize('name', ACTIVATION_FAMILIES)
def test_gptq_and_activations_on_gpu_match_cpu(family_cfg, tmp_path,
                                               gpu_device, name):
    """Uniform 4-bit GPTQ weights and W4A8 activations with per-site
    sensitivity: nothing here is drawn but the activation traces."""
    onnx = pytest.importorskip('onnx')
    from mmdet_hawq.deploy.onnx_export import export_onnx
    from mmdet_hawq.engine.exported import load_for_export
    from mmdet_hawq.quant.activations import load_ranges
    cfg = family_cfg(name)
    settings = dict(metric='uniform', bits=4, rounding='gptq',
                    calibration=dict(num_images=4, batch_size=2),
                    activations=dict(bits=8, method='minmax',
                                     sensitivity=True))
    cpu = run_hook(cfg, str(tmp_path / 'cpu'), 'cpu', **settings)
    gpu = run_hook(cfg, str(tmp_path / 'gpu'), gpu_device, **settings)
    # GPTQ: the same codes but for float32 round-off (a flipped code moves
    # the later columns a little): the devices' weights differ by far less
    # than either differs from the float weights
    floats = build_from(cfg).state_dict()
    for key in cpu['plan']:
        a, b = cpu['state'][key], gpu['state'][key]
        error = (a - floats[key]).norm()
        assert (a - b).norm() <= 0.25 * error + 1e-12, key
    # the activation ranges: min/max of the same activations
    assert set(gpu['ranges']) == set(cpu['ranges'])
    for site, r in cpu['ranges'].items():
        width = r['hi'] - r['lo']
        for end in ('lo', 'hi'):
            assert abs(gpu['ranges'][site][end] - r[end]) <= \
                0.02 * width + 1e-6, (site, end)
    # the activation traces: independent draws, within their errors
    rows = [{r['site']: r for r in run['sites']} for run in (cpu, gpu)]
    names = sorted(rows[0])
    assert sorted(rows[1]) == names
    ok = within_se(*[dict(mean=[r[n]['trace'] for n in names],
                          se=[r[n]['trace_se'] for n in names])
                     for r in rows])
    assert np.mean(ok) >= 0.9, (
        f'{sum(not x for x in ok)} of {len(ok)} sites beyond 3 SE')
    check_packed_loads_on_cpu(gpu)
    # a model that lives on the device exports what its CPU copy does (the
    # detector rebuilt from the packed file, as tools/export_onnx.py does)
    model, packed = load_for_export(cfg, gpu['packed'])
    ranges = load_ranges(osp.join(gpu['out'], 'activations.json'))
    protos = []
    for where, detector in (('host', model),
                            ('device', copy.deepcopy(model).to(gpu_device))):
        out_file = str(tmp_path / f'{where}.onnx')
        export_onnx(detector, out_file, (64, 64), packed=packed,
                    activations=ranges)
        assert next(detector.parameters()).device.type == \
            torch.device('cpu' if where == 'host' else gpu_device).type
        protos.append(onnx.load(out_file).SerializeToString())
    assert protos[0] == protos[1]


@pytest.mark.parametrize('name', ['deformable_twostage', 'dino'])
def test_loss_sensitivity_through_deformable_attention_on_gpu(
        family_cfg, tmp_path, gpu_device, name):
    """Hutchinson's double backward through deformable attention on the
    GPU (it failed in grid_sample's backward on CUDA before)."""
    gpu = run_hook(family_cfg(name), str(tmp_path), gpu_device,
                   metric='losssen', target_bits=4, bit_range=(3, 6),
                   calibration=dict(num_images=4, batch_size=2),
                   sensitivity=dict(tol=0.0, min_samples=2, max_samples=2))
    traces = cached_traces(gpu)['mean']
    assert np.isfinite(traces).all() and np.abs(traces).max() > 0
    assert gpu['summary']['avg_bits'] <= 4 + 1e-9


def test_sharded_traces_on_gpu_equal_one_process(tmp_path, gpu_device):
    """Two ranks with their weights on the GPU (gloo: NCCL needs a GPU per
    rank, and one is lent): the all-reduced samples of the three estimators
    equal one process's on the same device."""
    check_sharded_traces(tmp_path, gpu_device)

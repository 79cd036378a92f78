"""The checks in front of mmcv's compiled deformable attention and NMS:
tried once per device, routed to a PyTorch path where they fail (one log
line), kept where they run; on the CPU, with stand-ins for the compiled ops
and the probes' tiny inputs built on the CPU whatever the device. The
PyTorch NMS against mmcv's compiled one."""
import importlib
import sys

import pytest
import torch
from mmcv.ops import multi_scale_deform_attn as msda

from mmdet_hawq.models import compiled_ops as da
from mmdet_hawq.models import ensure_compiled_ops
from mmdet_hawq.sensitivity.double_backward import double_backward_kernels
from .test_bilinear import attention_inputs

mmcv_nms = importlib.import_module('mmcv.ops.nms')
grid_sample_path = msda.multi_scale_deformable_attn_pytorch
START = torch.tensor([0, 32, 44, 48])  # the levels of attention_inputs


class BrokenKernel:
    calls = 0

    @classmethod
    def apply(cls, *args):
        cls.calls += 1
        raise RuntimeError('ms_deform_attn_impl_forward: implementation for '
                           'device cuda:0 not found.\nmore details')


class WorkingKernel:
    calls = 0

    @classmethod
    def apply(cls, value, shapes, start, loc, weights, im2col_step):
        cls.calls += 1
        return grid_sample_path(value, shapes, loc, weights)


@pytest.fixture
def stand_in(monkeypatch):
    """``stand_in(kernel)``: ``kernel`` as mmcv's compiled function (before
    any check), tiny probe inputs on the CPU, log lines collected; all
    undone afterwards. Returns the collected lines."""
    cpu_inputs = da._probe_inputs
    monkeypatch.setattr(da, '_probe_inputs',
                        lambda device: cpu_inputs(torch.device('cpu')))
    nms_probe = da._CheckedNMS.probe
    monkeypatch.setattr(da._CheckedNMS, 'probe',
                        lambda self, device: nms_probe(self, 'cpu'))
    monkeypatch.setattr(mmcv_nms, 'ext_module', mmcv_nms.ext_module)
    logged = []
    monkeypatch.setattr(da, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))

    def install(kernel):
        kernel.calls = 0
        monkeypatch.setattr(msda, 'MultiScaleDeformableAttnFunction', kernel)
        return logged

    return install


def call(kernel):
    value, shapes, loc, weights = attention_inputs('cpu', borders=False)
    out = kernel.apply(value, shapes, START, loc, weights, 64)
    return out, grid_sample_path(value, shapes, loc, weights)


def test_a_failing_compiled_kernel_is_routed_to_pytorch_once(stand_in):
    logged = stand_in(BrokenKernel)
    assert ensure_compiled_ops() is None  # installs, tries nothing
    assert ensure_compiled_ops('cpu') is None
    assert BrokenKernel.calls == 0
    kernel = msda.MultiScaleDeformableAttnFunction
    assert kernel.compiled is BrokenKernel
    message = ensure_compiled_ops('cuda:0')
    assert message == (
        "mmcv's compiled deformable attention is not available on cuda:0 "
        '(ms_deform_attn_impl_forward: implementation for device cuda:0 not '
        'found.): DINO/Deformable DETR/DDQ-DETR run through a PyTorch path '
        '(slower, same results)')
    # idempotent: no second probe, no second message
    assert ensure_compiled_ops('cuda:0') is None
    assert BrokenKernel.calls == 1
    assert msda.MultiScaleDeformableAttnFunction is kernel
    # a call on a device not tried yet: tried once, logged once, routed
    out, ref = call(kernel)
    assert torch.equal(out, ref)
    out, ref = call(kernel)
    assert torch.equal(out, ref)
    assert BrokenKernel.calls == 2 and len(logged) == 1
    assert 'not available on cpu' in logged[0]
    # the Hessian mode's routing comes and goes on top of it
    with double_backward_kernels():
        assert msda.MultiScaleDeformableAttnFunction is not kernel
        assert ensure_compiled_ops('cuda:1') is None  # no check
    assert msda.MultiScaleDeformableAttnFunction is kernel


def test_a_working_compiled_kernel_is_kept(stand_in):
    logged = stand_in(WorkingKernel)
    with torch.no_grad():  # the probe's backward needs no caller's grad
        assert ensure_compiled_ops('cuda:0') is None
    kernel = msda.MultiScaleDeformableAttnFunction
    assert kernel.compiled is WorkingKernel and WorkingKernel.calls == 1
    out, ref = call(kernel)  # tried on the CPU once, then the kernel runs
    assert torch.equal(out, ref) and WorkingKernel.calls == 3
    call(kernel)
    assert WorkingKernel.calls == 4 and not logged
    ensure_compiled_ops()  # never wrapped twice
    assert msda.MultiScaleDeformableAttnFunction is kernel


def test_without_mmcv_ops_nothing_happens(stand_in, monkeypatch):
    stand_in(BrokenKernel)
    monkeypatch.setitem(sys.modules, 'mmcv.ops', None)
    assert ensure_compiled_ops('cuda:0') is None
    assert BrokenKernel.calls == 0
    assert msda.MultiScaleDeformableAttnFunction is BrokenKernel


def test_the_package_import_installs_the_checks():
    """mmcv's kernels are checked in every process that loads the plugin
    (mmdet's test.py through custom_imports included)."""
    kernel = msda.MultiScaleDeformableAttnFunction
    assert isinstance(kernel, da._CheckedDeformableAttention)
    assert kernel.compiled.__name__ == 'MultiScaleDeformableAttnFunction'
    assert isinstance(mmcv_nms.ext_module, da._CheckedNMS)
    # the other ops of mmcv's module are its own
    assert mmcv_nms.ext_module.softnms is mmcv_nms.ext_module.compiled.softnms


class BrokenOps:
    """mmcv's compiled ops module as built without ops (gpu_check.sh's
    stand-in)."""
    calls = 0

    def __getattr__(self, name):
        def missing(*args, **kwargs):
            BrokenOps.calls += 1
            raise RuntimeError(f'{name}: mmcv was built without compiled ops')
        return missing


def random_boxes(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 50
    wh = torch.rand(n, 2, generator=gen) * 20 + 1
    # distinct scores: equal ones may be taken in either order
    scores = torch.randperm(n, generator=gen).float() / n
    return torch.cat([xy, xy + wh], 1), scores


@pytest.mark.parametrize('offset', [0, 1])
@pytest.mark.parametrize('threshold', [0.0, 0.3, 0.7])
def test_torch_nms_keeps_what_mmcv_keeps(threshold, offset):
    for seed in range(5):
        boxes, scores = random_boxes(200, seed)
        ours = da.torch_nms(boxes, scores, threshold, offset)
        ref = mmcv_nms.ext_module.compiled.nms(
            boxes, scores, iou_threshold=threshold, offset=offset)
        assert ours.dtype == torch.long
        assert torch.equal(ours, ref)
        assert 0 < len(ours) < 200  # something was dropped, not all


def test_a_failing_nms_is_routed_to_pytorch_once(stand_in, monkeypatch):
    """DDQ-DETR's batched_nms through mmcv's own nms() with its compiled op
    missing: one log line, the same kept boxes as mmcv's compiled NMS."""
    logged = stand_in(WorkingKernel)
    boxes, scores = random_boxes(300, 0)
    ref = mmcv_nms.ext_module.compiled.nms(boxes, scores,
                                           iou_threshold=0.5, offset=0)
    BrokenOps.calls = 0
    monkeypatch.setattr(mmcv_nms, 'ext_module', BrokenOps())
    with torch.no_grad():
        message = ensure_compiled_ops('cuda:0')
    assert message == (
        "mmcv's compiled NMS is not available on cuda:0 (nms: mmcv was built "
        "without compiled ops): DDQ-DETR's query selections run through a "
        'PyTorch path (slower, same results)')
    assert ensure_compiled_ops('cuda:0') is None and BrokenOps.calls == 1
    from mmcv.ops import batched_nms
    for _ in range(2):
        dets, keep = batched_nms(boxes, scores, torch.ones_like(scores),
                                 dict(type='nms', iou_threshold=0.5))
        assert torch.equal(keep, ref)
        assert torch.equal(dets[:, 4], scores[ref])
    assert BrokenOps.calls == 2 and len(logged) == 1  # cpu: tried once
    assert "compiled NMS is not available on cpu" in logged[0]

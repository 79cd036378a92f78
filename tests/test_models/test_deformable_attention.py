"""The check in front of mmcv's compiled deformable attention: tried once
per device, routed to mmcv's PyTorch path where it fails (one log line),
kept where it runs; on the CPU, with stand-ins for the compiled kernel and
the probe's tiny inputs built on the CPU whatever the device."""
import sys

import pytest
import torch
from mmcv.ops import multi_scale_deform_attn as msda

from mmdet_hawq.models import deformable_attention as da
from mmdet_hawq.models import ensure_deformable_attention
from mmdet_hawq.sensitivity.double_backward import double_backward_kernels
from .test_bilinear import attention_inputs

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
    assert ensure_deformable_attention() is None  # installs, tries nothing
    assert ensure_deformable_attention('cpu') is None
    assert BrokenKernel.calls == 0
    kernel = msda.MultiScaleDeformableAttnFunction
    assert kernel.compiled is BrokenKernel
    message = ensure_deformable_attention('cuda:0')
    assert message == (
        "mmcv's compiled deformable attention is not available on cuda:0 "
        '(ms_deform_attn_impl_forward: implementation for device cuda:0 not '
        "found.): DINO/Deformable DETR run through mmcv's PyTorch path "
        '(slower, same results)')
    # idempotent: no second probe, no second message
    assert ensure_deformable_attention('cuda:0') is None
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
        assert ensure_deformable_attention('cuda:1') is None  # no check
    assert msda.MultiScaleDeformableAttnFunction is kernel


def test_a_working_compiled_kernel_is_kept(stand_in):
    logged = stand_in(WorkingKernel)
    with torch.no_grad():  # the probe's backward needs no caller's grad
        assert ensure_deformable_attention('cuda:0') is None
    kernel = msda.MultiScaleDeformableAttnFunction
    assert kernel.compiled is WorkingKernel and WorkingKernel.calls == 1
    out, ref = call(kernel)  # tried on the CPU once, then the kernel runs
    assert torch.equal(out, ref) and WorkingKernel.calls == 3
    call(kernel)
    assert WorkingKernel.calls == 4 and not logged
    ensure_deformable_attention()  # never wrapped twice
    assert msda.MultiScaleDeformableAttnFunction is kernel


def test_without_mmcv_ops_nothing_happens(stand_in, monkeypatch):
    stand_in(BrokenKernel)
    monkeypatch.setitem(sys.modules, 'mmcv.ops', None)
    assert ensure_deformable_attention('cuda:0') is None
    assert BrokenKernel.calls == 0
    assert msda.MultiScaleDeformableAttnFunction is BrokenKernel


def test_the_package_import_installs_the_check():
    """mmcv's kernel is checked in every process that loads the plugin
    (mmdet's test.py through custom_imports included)."""
    kernel = msda.MultiScaleDeformableAttnFunction
    assert isinstance(kernel, da._CheckedDeformableAttention)
    assert kernel.compiled.__name__ == 'MultiScaleDeformableAttnFunction'

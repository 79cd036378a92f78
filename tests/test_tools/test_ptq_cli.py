"""tools/ptq.py: bad input stops with one clear line; the layer listing."""
import os.path as osp

import pytest

from ..conftest import ROOT, run_tool

pytestmark = pytest.mark.slow


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith('error: ')
    return lines[0]


def test_missing_checkpoint(tmp_path):
    line = one_error_line(run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_uniform_8bit.py',
        '--checkpoint', str(tmp_path / 'missing.pth')))
    assert 'missing.pth' in line and '--checkpoint' in line


def test_corrupted_checkpoint(tmp_path, tiny_data):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    line = one_error_line(run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_uniform_8bit.py',
        '--checkpoint', str(bad), '--work-dir', str(tmp_path / 'w'),
        '--cfg-options', f'test_dataloader.dataset.data_root={tiny_data}/',
        f'test_evaluator.ann_file={tiny_data}/annotations/'
        'instances_val.json'))
    assert 'bad.pth' in line and 'corrupted' in line


def test_missing_dataset_folder(tmp_path):
    line = one_error_line(run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_uniform_8bit.py',
        '--work-dir', str(tmp_path / 'w'), '--cfg-options',
        f'test_dataloader.dataset.data_root={tmp_path}/nowhere/'))
    assert 'nowhere' in line and 'make data' in line


@pytest.mark.parametrize('plan,match', [
    ('{"no.such.weight": 4}', 'does not have'),
    ('{"backbone.conv1.weight": 4}', 'lacks'),
])
def test_bad_plans(tmp_path, plan, match):
    path = tmp_path / 'plan.json'
    path.write_text(plan)
    cfg = tmp_path / 'plan_cfg.py'
    cfg.write_text(
        f"_base_ = '{ROOT}/configs/_base_/detr_tiny_shapes_hawq.py'\n"
        "custom_hooks = [dict(type='DistillSensitivityHook', "
        f"metric='plan', plan_file='{path}')]\n")
    line = one_error_line(run_tool(
        'tools/ptq.py', str(cfg), '--work-dir', str(tmp_path / 'w')))
    assert match in line


@pytest.mark.parametrize('config,family,head', [
    ('detr/detr_tiny_shapes.py', 'DETR, softmax', 'bbox_head.fc_cls.weight'),
    ('dino/dino_tiny_shapes.py', 'DINO, sigmoid',
     'bbox_head.cls_branches.3.weight'),
])
def test_list_layers(config, family, head):
    proc = run_tool('tools/ptq.py', f'configs/{config}', '--list-layers')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert family in proc.stdout.splitlines()[0]
    assert 'query_embedding.weight' in proc.stdout
    line = [x for x in proc.stdout.splitlines() if x.startswith(head)][0]
    assert 'float (final class/box FFN of the head' in line


def test_checkpoint_of_another_model_stops_before_the_float_run(tmp_path):
    """--float has no hook: the strict check must come before any run."""
    import torch
    state = torch.load(osp.join(ROOT, 'checkpoints', 'detr_tiny_shapes.pth'),
                       weights_only=False)['state_dict']
    del state['query_embedding.weight']
    bad = tmp_path / 'other.pth'
    torch.save(dict(state_dict=state), bad)
    work = tmp_path / 'w'
    line = one_error_line(run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_uniform_4bit.py',
        '--float',
        '--checkpoint', str(bad), '--work-dir', str(work)))
    assert 'other.pth' in line and 'query_embedding.weight' in line
    assert not (work / 'float').exists()


def test_unknown_critical_class_stops_before_any_data(tmp_path):
    """--cfg-options sets the sensitivity's critical_classes; a typo is one
    line listing the dataset's classes, before the data is read."""
    line = one_error_line(run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_outquant_4bit.py',
        '--work-dir', str(tmp_path / 'w'), '--cfg-options',
        'custom_hooks.0.sensitivity.critical_classes=[cross,sqare]',
        f'test_dataloader.dataset.data_root={tmp_path}/nowhere/'))
    assert ("'sqare' is not a class of the dataset: the classes are "
            'ellipse, rectangle, triangle, cross') in line
    assert 'nowhere' not in line


def test_gptq_config_and_its_uniform_baseline(tmp_path, tiny_data):
    """A shipped GPTQ config through tools/ptq.py: the uniform baseline
    rounds with GPTQ too, and the summary says so."""
    data = [f'{dl}.dataset.data_root={tiny_data}/' for dl in (
        'train_dataloader', 'test_dataloader')]
    proc = run_tool(
        'tools/ptq.py', 'configs/detr/detr_tiny_shapes_outquant_3bit_gptq.py',
        '--uniform-baseline', '--work-dir', str(tmp_path / 'w'),
        '--cfg-options', *data,
        f'test_evaluator.ann_file={tiny_data}/annotations/'
        'instances_val.json', 'custom_hooks.0.calibration.num_images=4',
        'custom_hooks.0.calibration.batch_size=2',
        'custom_hooks.0.sensitivity.min_samples=2',
        'custom_hooks.0.sensitivity.max_samples=2', timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '(avg 3.000 bits, GPTQ rounding)' in proc.stdout
    assert '(outquant, GPTQ rounding, avg 2.' in proc.stdout


def test_gptq_warnings_are_repeated_in_the_summary(tmp_path, tiny_cfg):
    """GPTQ from one calibration image: the log's 'too small' warning is
    also a line of the final summary."""
    import copy
    cfg = copy.deepcopy(tiny_cfg)
    cfg.custom_hooks = [dict(
        type='DistillSensitivityHook', metric='uniform', bits=4,
        rounding='gptq', save_packed=False,
        calibration=dict(num_images=1, batch_size=1))]
    path = tmp_path / 'gptq.py'
    cfg.dump(str(path))
    proc = run_tool('tools/ptq.py', str(path), '--work-dir',
                    str(tmp_path / 'w'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.split('== mmdet-hawq PTQ summary ==')[1]
    warned = [ln for ln in summary.splitlines()
              if ln.startswith('warning    ')]
    assert len(warned) == 1, summary
    assert 'gptq: the calibration set is too small for' in warned[0]
    assert 'use more calibration images' in warned[0]


def test_the_design_cards_command_as_written(monkeypatch):
    """``python tools/ptq.py configs/detr_r50_outquant_5bit.py`` (the
    design card's command) reads its config, passes the detector and
    work-dir checks and builds its hook; it stops before the COCO
    checkpoint is downloaded."""
    import importlib.util
    import sys

    from mmdet.registry import HOOKS
    spec = importlib.util.spec_from_file_location(
        'hawq_tool_ptq', osp.join(ROOT, 'tools', 'ptq.py'))
    ptq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ptq)
    monkeypatch.chdir(ROOT)
    work_dirs = []
    monkeypatch.setattr(ptq, 'check_work_dir', work_dirs.append)
    monkeypatch.setattr(sys, 'argv', ['tools/ptq.py',
                                      'configs/detr_r50_outquant_5bit.py'])
    cfg = ptq.load_config(ptq.parse_args())
    ptq.check_detector(cfg)
    assert work_dirs == ['./work_dirs/detr_r50_outquant_5bit']
    assert cfg.model.type == 'DETR' and cfg.model.backbone.depth == 50
    assert cfg.load_from.startswith('https://download.openmmlab.com/')
    assert cfg.test_evaluator.type == 'CocoMetric'
    (hook_cfg, ) = ptq.hawq_hooks(cfg)
    hook = HOOKS.build(dict(hook_cfg))
    assert type(hook).__name__ == 'DistillSensitivityHook'
    assert (hook.settings.metric, hook.settings.target_bits,
            hook.settings.bit_range) == ('outquant', 5, (3, 6))

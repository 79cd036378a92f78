"""tools/ptq.py, and mmdet's own tools/test.py where the case reaches the
plugin, on bad inputs (issue 15): each case exits non-zero with exactly one
stderr line starting ``error:``, and leaves its input files byte-identical.
Most fail before any data is loaded, and under tools/ptq.py before the
Runner is built (no mmengine log first). An unexpected exception inside the
hook (a bug) names where it was raised instead."""
import copy
import hashlib
import json
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config

import mmdet
from ..conftest import ROOT, mmdet_config

pytestmark = pytest.mark.slow

#: The user's environment: Python's default warning filters, which
#: conftest's ``run_tool`` turns off (a clean run prints no warning).
USER_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
NAN_WEIGHT = 'encoder.layers.0.self_attn.attn.in_proj_weight'
#: mmdet's own test script, as installed with the package.
MMDET_TEST = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools',
                      'test.py')
#: mmengine imports pkg_resources before mmdet's test.py can load the
#: plugin: setuptools' deprecation notice comes with every run of it, good or
#: bad, and no plugin code can silence it; every other warning still counts.
MMDET_TEST_ENV = dict(
    USER_ENV, PYTHONWARNINGS='ignore:pkg_resources is deprecated:UserWarning')


def run_tool(*args, timeout=300, env=None):
    """Run a project tool with Python's default warning filters."""
    return subprocess.run([sys.executable, *args], cwd=ROOT,
                          env=env or USER_ENV, capture_output=True,
                          text=True, timeout=timeout)


def mmdet_test_args(args):
    """A case's ptq.py arguments as mmdet's test.py takes them: ``CONFIG
    CHECKPOINT [--work-dir DIR]``, the checkpoint from ``--checkpoint`` or
    else the config's ``load_from``."""
    config, rest = args[0], list(args[1:])
    if '--checkpoint' in rest:
        at = rest.index('--checkpoint')
        checkpoint = rest.pop(at + 1)
        rest.pop(at)
    else:
        checkpoint = Config.fromfile(config).load_from
    return [config, checkpoint, *rest]


def sha256s(paths):
    out = {}
    for path in paths:
        with open(path, 'rb') as f:
            out[str(path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_cfg(tiny_cfg, path, hook=None, **extra):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', **(
        hook or dict(metric='uniform', bits=4)))]
    cfg.merge_from_dict(extra)
    cfg.dump(str(path))
    return path


def case_nan_checkpoint(tmp_path, tiny_cfg):
    state = torch.load(tiny_cfg.load_from, weights_only=False)
    state['state_dict'][NAN_WEIGHT][0, 0] = float('nan')
    ckpt = tmp_path / 'nan.pth'
    torch.save(state, ckpt)
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', load_from=str(ckpt))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg, ckpt],
            [NAN_WEIGHT, '1 of 3072 elements', 'check the checkpoint'])


def case_work_dir_under_a_file(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    afile = tmp_path / 'afile'
    afile.write_text('x')
    return ([str(cfg), '--work-dir', str(afile / 'w')], [cfg, afile],
            ['work dir', 'afile/w', '--work-dir'])


def case_config_syntax_error(tmp_path, tiny_cfg):
    cfg = tmp_path / 'broken.py'
    cfg.write_text("_base_ = './base.py'\nmodel = dict(\n  x=1,\n")
    (tmp_path / 'base.py').write_text('a = 1\n')
    return [str(cfg)], [cfg], ['broken.py', 'line 2', 'syntax error']


def case_base_config_syntax_error(tmp_path, tiny_cfg):
    cfg = tmp_path / 'child.py'
    cfg.write_text("_base_ = './base.py'\nb = 2\n")
    base = tmp_path / 'base.py'
    base.write_text('a = 1\nc = [1,\n')
    return [str(cfg)], [cfg, base], ['base.py', 'line 2', 'syntax error']


def case_hook_argument_typo(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py',
                    hook=dict(metric='outquant', target_bit=5))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ["unknown argument 'target_bit'", "did you mean 'target_bits'"])


def case_infeasible_budget(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=2.5, bit_range=(3, 6)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['target_bits=2.5', 'bit_range=(3, 6)'])


def case_bad_bits(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py',
                    hook=dict(metric='uniform', bits=9))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['bits 9', 'from 2 to 8'])


def case_bad_plan_entry(tmp_path, tiny_cfg):
    from mmdet.registry import MODELS

    from mmdet_hawq.quant import quantizable_weights
    names = list(quantizable_weights(MODELS.build(copy.deepcopy(
        tiny_cfg.model))))
    plan = tmp_path / 'myplan.json'
    plan.write_text(json.dumps(dict({n: 4 for n in names}, **{names[0]: 1})))
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py',
                    hook=dict(metric='plan', plan_file=str(plan)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg, plan],
            ['myplan.json', 'bit-width of', 'or null'])


def case_unknown_plan_weight(tmp_path, tiny_cfg):
    plan = tmp_path / 'plan.json'
    plan.write_text('{"no.such.weight": 4}')
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py',
                    hook=dict(metric='plan', plan_file=str(plan)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg, plan],
            ['plan.json', 'does not have'])


def case_unknown_sensitivity_key(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4, sensitivity=dict(num_image=4)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['num_image', 'sensitivity setting'])


def case_bad_sensitivity_value(tmp_path, tiny_cfg):
    # once found only after the whole sensitivity sampling
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4,
        calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2,
                         negative_traces='clip')))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ["negative_traces='clip'", 'ucb, zero, abs, error'])


def case_zero_batch_size(tmp_path, tiny_cfg):
    # once a torch DataLoader traceback after the calibration set was built
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4,
        calibration=dict(num_images=4, batch_size=0),
        sensitivity=dict(min_samples=2, max_samples=2)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['batch_size=0', 'an integer of at least 1'])


def case_bit_range_not_a_pair(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4, bit_range=[3]))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['bit_range [3] is not a pair', '(low, high)'])


def case_pattern_matches_nothing(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='uniform', bits=4, include=['no_such_layer.*']))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['no_such_layer', 'match no quantizable weight'])


def case_checkpoint_url_unreachable(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    url = 'http://127.0.0.1:9/detr-r50-e632da11.pth'
    return ([str(cfg), '--checkpoint', url, '--work-dir',
             str(tmp_path / 'w')], [cfg], [url, 'could not be loaded'])


def case_missing_checkpoint(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    return ([str(cfg), '--checkpoint', str(tmp_path / 'missing.pth')],
            [cfg], ['missing.pth', 'does not exist'])


def case_corrupted_checkpoint(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    return ([str(cfg), '--checkpoint', str(bad), '--work-dir',
             str(tmp_path / 'w')], [cfg, bad], ['bad.pth', 'corrupted'])


def case_truncated_checkpoint(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    bad = tmp_path / 'half.pth'
    with open(tiny_cfg.load_from, 'rb') as f:
        data = f.read()
    bad.write_bytes(data[:len(data) // 2])
    return ([str(cfg), '--checkpoint', str(bad), '--work-dir',
             str(tmp_path / 'w')], [cfg, bad], ['half.pth', 'corrupted'])


def case_checkpoint_of_another_model(tmp_path, tiny_cfg):
    state = torch.load(tiny_cfg.load_from, weights_only=False)
    del state['state_dict']['query_embedding.weight']
    other = tmp_path / 'other.pth'
    torch.save(state, other)
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', load_from=str(other))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg, other],
            ['other.pth', 'query_embedding.weight'])


def case_bit_range_out_of_range(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4, bit_range=(1, 6)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg],
            ['bit_range low end 1', 'from 2 to 8'])


def case_missing_data(tmp_path, tiny_cfg):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    return ([str(cfg), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
             f'test_dataloader.dataset.data_root={tmp_path}/nowhere/'],
            [cfg], ['nowhere', 'make data'])


def case_missing_evaluator_annotations(tmp_path, tiny_cfg):
    # was mmengine's traceback from CocoMetric, after the Runner's log
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    return ([str(cfg), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
             f'test_evaluator.ann_file={tmp_path}/nowhere/val.json'],
            [cfg], ["test_evaluator annotation file '", "nowhere/val.json' "
                    'does not exist', 'test_evaluator.ann_file'])


def case_empty_calibration_set(tmp_path, tiny_cfg):
    ann = json.load(open(tiny_cfg.val_evaluator.ann_file))
    empty = tmp_path / 'empty'
    (empty / 'annotations').mkdir(parents=True)
    (empty / 'annotations' / 'instances_train.json').write_text(
        json.dumps(dict(ann, images=[], annotations=[])))
    (empty / 'train').mkdir()
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4,
        calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(min_samples=2, max_samples=2)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
             f'train_dataloader.dataset.data_root={empty}/'],
            [cfg], ['calibration dataset is empty'])


def case_missing_config(tmp_path, tiny_cfg):
    return [str(tmp_path / 'nope.py')], [], ['nope.py', 'does not exist']


def case_moved_config(tmp_path, tiny_cfg):
    # a path of the flat configs/ folder the configs had before their
    # family folders
    return (['configs/detr_tiny_shapes_outquant_5bit.py'], [],
            ['config configs/detr_tiny_shapes_outquant_5bit.py does not '
             'exist: it moved to configs/detr/'
             'detr_tiny_shapes_outquant_5bit.py'])


def case_nonfinite_outputs(tmp_path, tiny_cfg):
    # finite weights whose outputs overflow: the calibration batch stops it
    state = torch.load(tiny_cfg.load_from, weights_only=False)
    state['state_dict']['neck.convs.0.conv.weight'] *= 1e20
    ckpt = tmp_path / 'overflow.pth'
    torch.save(state, ckpt)
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', load_from=str(ckpt),
                    hook=dict(metric='outquant', target_bits=4,
                              save_packed=False,
                              calibration=dict(num_images=4, batch_size=2),
                              sensitivity=dict(min_samples=2, max_samples=2)))
    return ([str(cfg), '--work-dir', str(tmp_path / 'w')], [cfg, ckpt],
            ["the student's outputs have NaN/Inf values on calibration "
             'batch 1 of 2 (images ', '.png', 'check that the checkpoint'])


def images_missing(tmp_path, tiny_cfg, split, expected, hook=None,
                   folder=False):
    """A run whose ``split`` dataloader's data root holds the tiny data's
    annotations and no image (with ``folder``: an empty image folder)."""
    root = tmp_path / 'noimages'
    shutil.copytree(
        osp.join(tiny_cfg.test_dataloader.dataset.data_root, 'annotations'),
        root / 'annotations')
    if folder:
        (root / 'val').mkdir()
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook)
    return ([str(cfg), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
             f'{split}_dataloader.dataset.data_root={root}/'], [cfg],
            [text.format(root=root) for text in expected])


def case_missing_image_folder(tmp_path, tiny_cfg):
    # once the whole quantization, then a 515-line DataLoader traceback
    return images_missing(
        tmp_path, tiny_cfg, 'test',
        ["test split image folder '{root}/val/' does not exist",
         'make data', 'data_prefix.img'])


def case_missing_calibration_images(tmp_path, tiny_cfg):
    return images_missing(
        tmp_path, tiny_cfg, 'train',
        ["calibration set image folder '{root}/train/' does not exist",
         'make data', 'train_dataloader.dataset'],
        hook=dict(metric='outquant', target_bits=4,
                  calibration=dict(num_images=4, batch_size=2),
                  sensitivity=dict(min_samples=2, max_samples=2)))


def case_empty_image_folder(tmp_path, tiny_cfg):
    # the folder is there, its images are not: found on the test split's
    # first image, before the hook's first step
    return images_missing(
        tmp_path, tiny_cfg, 'test',
        ["test split image '{root}/val/", ".png' does not exist",
         'make data'], folder=True)


def case_unsupported_detector(tmp_path, tiny_cfg):
    # once named only after the checkpoint was loaded: a DETR checkpoint
    # stopped it with a key mismatch instead
    cfg = Config.fromfile(
        mmdet_config('retinanet/retinanet_r50_fpn_1x_coco.py'))
    for key in ('custom_imports', 'train_dataloader', 'val_dataloader',
                'test_dataloader', 'val_evaluator', 'test_evaluator',
                'load_from'):
        cfg[key] = copy.deepcopy(tiny_cfg[key])
    cfg.custom_hooks = [dict(type='DistillSensitivityHook', metric='uniform',
                             bits=4)]
    path = tmp_path / 'retinanet.py'
    cfg.dump(str(path))
    return ([str(path), '--work-dir', str(tmp_path / 'w')], [path],
            ['detector type RetinaNet', 'not supported',
             'DeformableDETR, DINO, DDQDETR'])


CASES = [
    case_nan_checkpoint, case_work_dir_under_a_file,
    case_config_syntax_error, case_base_config_syntax_error,
    case_hook_argument_typo, case_infeasible_budget, case_bad_bits,
    case_bad_plan_entry, case_unknown_plan_weight,
    case_unknown_sensitivity_key, case_bad_sensitivity_value,
    case_zero_batch_size, case_bit_range_not_a_pair,
    case_pattern_matches_nothing, case_checkpoint_url_unreachable,
    case_missing_checkpoint, case_corrupted_checkpoint,
    case_truncated_checkpoint, case_checkpoint_of_another_model,
    case_bit_range_out_of_range, case_missing_data,
    case_missing_evaluator_annotations,
    case_empty_calibration_set, case_missing_config, case_moved_config,
    case_nonfinite_outputs,
    case_missing_image_folder, case_missing_calibration_images,
    case_empty_image_folder, case_unsupported_detector,
]
#: The cases that reach the plugin through mmdet's test.py; the others stop
#: in mmengine before it (config syntax, missing config or checkpoint
#: files, a work dir under a file: mmengine's own errors).
MMDET_TEST_CASES = [
    case_hook_argument_typo, case_infeasible_budget, case_bad_bits,
    case_nan_checkpoint, case_bad_plan_entry, case_unknown_plan_weight,
    case_unknown_sensitivity_key, case_bad_sensitivity_value,
    case_zero_batch_size, case_bit_range_not_a_pair,
    case_pattern_matches_nothing, case_nonfinite_outputs,
    case_checkpoint_of_another_model, case_bit_range_out_of_range,
    case_empty_calibration_set, case_missing_image_folder,
    case_missing_calibration_images, case_empty_image_folder,
    case_unsupported_detector,
]
#: Cases found only on the calibration data, after the hook's first step.
DATA_CASES = {case_nonfinite_outputs, case_empty_calibration_set}
#: Cases tools/ptq.py finds only once the Runner is built (on the data it
#: loads); it finds every other case before, with no mmengine log.
RUNNER_CASES = DATA_CASES | {case_empty_image_folder}
#: Lines tools/ptq.py may print on stdout before a case it finds before the
#: Runner is built (the Runner's log alone is hundreds).
EARLY_STDOUT_LINES = 5


def stderr_lines(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def check_one_error_line(proc, case, tmp_path, inputs, before, expected):
    lines = stderr_lines(proc)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), \
        proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert sha256s(inputs) == before
    if case not in DATA_CASES:
        assert not (tmp_path / 'w' / 'hawq').exists()  # no data step ran


@pytest.mark.parametrize('case', CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_error_line(case, tmp_path, tiny_cfg):
    args, inputs, expected = case(tmp_path, tiny_cfg)
    before = sha256s(inputs)
    proc = run_tool('tools/ptq.py', *args)
    check_one_error_line(proc, case, tmp_path, inputs, before, expected)
    if case not in RUNNER_CASES:
        assert len(proc.stdout.splitlines()) <= EARLY_STDOUT_LINES, \
            proc.stdout[-3000:]


@pytest.mark.parametrize('case', MMDET_TEST_CASES,
                         ids=[c.__name__[5:] for c in MMDET_TEST_CASES])
def test_bad_input_through_mmdet_test_py(case, tmp_path, tiny_cfg):
    args, inputs, expected = case(tmp_path, tiny_cfg)
    before = sha256s(inputs)
    proc = run_tool(MMDET_TEST, *mmdet_test_args(args), env=MMDET_TEST_ENV)
    check_one_error_line(proc, case, tmp_path, inputs, before, expected)


def test_moved_config_finds_the_family_folder(tmp_path, monkeypatch):
    from mmdet_hawq.engine.cli import CONFIGS_DIR, moved_config
    monkeypatch.chdir(ROOT)
    assert moved_config('configs/detr_r50_outquant_4bit.py') == \
        'configs/detr/detr_r50_outquant_4bit.py'
    assert moved_config('./configs/dino_tiny_shapes.py') == \
        './configs/dino/dino_tiny_shapes.py'
    assert moved_config(osp.join(ROOT, 'configs', 'shapes_backbone_'
                                 'pretrain.py')) == \
        osp.join(CONFIGS_DIR, 'shapes', 'shapes_backbone_pretrain.py')
    # from a folder outside the checkout: the absolute path
    monkeypatch.chdir(tmp_path)
    assert moved_config('configs/deformable_detr_r50_uniform_8bit.py') == \
        osp.join(CONFIGS_DIR, 'deformable_detr',
                 'deformable_detr_r50_uniform_8bit.py')
    monkeypatch.chdir(ROOT)
    # files that exist, _base_ files, unknown names: nothing moved
    assert moved_config('configs/detr/detr_r50_outquant_5bit.py') is None
    assert moved_config('configs/detr_r50_hawq.py') is None
    assert moved_config('configs/nope.py') is None
    assert moved_config('configs/detr') is None


@pytest.mark.parametrize('kwargs,expected', [
    (dict(sensitivity=dict(max_samples=0)), 'max_samples=0'),
    (dict(sensitivity=dict(min_samples=20, max_samples=10)),
     'min_samples <= max_samples'),
    (dict(sensitivity=dict(tol=-0.1)), 'tol=-0.1'),
    (dict(calibration=dict(num_images='100')), "num_images='100'"),
    (dict(sensitivity=dict(temperature=0)), 'temperature=0'),
    (dict(sensitivity=dict(use_cache='no')), "use_cache='no'"),
    (dict(sensitivity=dict(decoder_layers=5)), 'decoder_layers=5'),
    (dict(sensitivity='fast'), "sensitivity 'fast' is not a dict"),
    (dict(bit_range=4), 'bit_range 4 is not a pair'),
    (dict(target_bits=float('nan')), 'not a finite number'),
])
def test_option_values_are_checked_when_the_hook_is_built(kwargs,
                                                          expected):
    """Data-free checks at construction: in mmdet's test.py, before the
    Runner builds any dataset."""
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    from mmdet_hawq.errors import HawqUserError
    with pytest.raises(HawqUserError, match=re.escape(expected)):
        DistillSensitivityHook(**dict(dict(metric='outquant',
                                           target_bits=4), **kwargs))


def test_plan_file_is_read_when_the_hook_is_built(tmp_path):
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    from mmdet_hawq.errors import HawqUserError
    plan = tmp_path / 'myplan.json'
    plan.write_text('{"a.weight": 4, "b.weight": 12}')
    with pytest.raises(HawqUserError) as err:
        DistillSensitivityHook(metric='plan', plan_file=str(plan))
    assert 'myplan.json' in str(err.value) and "'b.weight'" in str(err.value)
    assert 'or null to keep the weight in float' in str(err.value)
    with pytest.raises(HawqUserError, match='could not be read'):
        DistillSensitivityHook(metric='plan',
                               plan_file=str(tmp_path / 'none.json'))


def test_bit_width_message_offers_null_only_for_plans():
    """Issue 15 item 11: ``bits=`` and ``bit_range=`` cannot be null."""
    from mmdet_hawq.engine.hooks import DistillSensitivityHook
    from mmdet_hawq.errors import HawqUserError
    for kwargs in (dict(metric='uniform', bits=9),
                   dict(metric='outquant', target_bits=4, bit_range=(1, 6)),
                   dict(metric='outquant', target_bits=4, bit_range=(3, 9))):
        with pytest.raises(HawqUserError) as err:
            DistillSensitivityHook(**kwargs)
        assert 'from 2 to 8' in str(err.value)
        assert 'null' not in str(err.value)


def test_excepthook_handles_only_user_errors(monkeypatch, capsys):
    from mmdet_hawq import errors
    seen = []

    def previous(exc_type, exc, tb):
        seen.append(exc_type)

    monkeypatch.setattr(sys, 'excepthook', previous)
    monkeypatch.setattr(errors, '_in_process_group', lambda: False)
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    errors.install_excepthook()
    errors.install_excepthook()  # chained once
    hook = sys.excepthook
    assert hook is not previous and hook._hawq_previous is previous
    hook(ValueError, ValueError('x'), None)
    assert seen == [ValueError]
    with pytest.raises(SystemExit) as stop:
        hook(errors.HawqUserError, errors.HawqUserError('bad plan'), None)
    assert stop.value.code == 2 and seen == [ValueError]
    assert capsys.readouterr().err == 'error: bad plan\n'
    monkeypatch.setattr(sys, 'ps1', '>>> ', raising=False)
    hook(errors.HawqUserError, errors.HawqUserError('bad plan'), None)
    assert capsys.readouterr().err == 'error: bad plan\n'  # a REPL goes on
    monkeypatch.setenv(errors.TRACEBACK_ENV, '1')  # the traceback wanted
    hook(errors.HawqUserError, errors.HawqUserError('bad plan'), None)
    assert seen == [ValueError, errors.HawqUserError]
    assert capsys.readouterr().err == ''


#: Runs a tool (its path, then its arguments) with the hook's packing step
#: raising ``ERROR``: an unexpected error, or a user error.
FAULT_SCRIPT = """import runpy
import sys

from mmdet_hawq import report
from mmdet_hawq.errors import HawqUserError  # noqa: F401


def faulty_pack(*args, **kwargs):
    raise ERROR("can't convert cuda:0 device type tensor to numpy")


report.pack_state_dict = faulty_pack
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
CUDA_MESSAGE = "can't convert cuda:0 device type tensor to numpy"


def run_with_fault(tmp_path, tiny_cfg, tool, error):
    """``tool`` (ptq.py or mmdet's test.py) on the tiny DETR, uniform 4-bit,
    with the packing step raising ``error``; returns the process and
    ``FILE:LINE`` of the raise."""
    script = tmp_path / 'fault.py'
    script.write_text(FAULT_SCRIPT.replace('ERROR', error))
    line = next(i for i, text in enumerate(FAULT_SCRIPT.splitlines(), 1)
                if 'raise ERROR' in text)
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py')
    args = [str(cfg), '--work-dir', str(tmp_path / 'w')]
    if tool == 'mmdet_test':
        proc = run_tool(str(script), MMDET_TEST, *mmdet_test_args(args),
                        env=MMDET_TEST_ENV)
    else:
        proc = run_tool(str(script), 'tools/ptq.py', *args)
    return proc, f'{script}:{line}'


@pytest.mark.parametrize('tool', ['ptq', 'mmdet_test'])
def test_internal_error_names_its_origin(tool, tmp_path, tiny_cfg):
    """A bug inside the hook (here a TypeError, which mmengine's call_hook
    re-raises ``from None`` as '... in <hook>') shows the file and line of
    the raise and the original traceback."""
    proc, where = run_with_fault(tmp_path, tiny_cfg, tool, 'TypeError')
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = stderr_lines(proc)
    assert lines[0] == (f'internal error in mmdet-hawq at {where} in '
                        f'faulty_pack: TypeError: {CUDA_MESSAGE}'), \
        proc.stderr[-3000:]
    script, line = where.rsplit(':', 1)
    assert lines[1] == 'Traceback (most recent call last):'
    assert f'File "{script}", line {line}, in faulty_pack' in proc.stderr
    assert 'in before_test' in proc.stderr  # the hook's own frames
    assert lines[-1] == f'TypeError: {CUDA_MESSAGE}'
    assert ' in <mmdet_hawq.' not in proc.stderr  # not mmengine's wrapper


@pytest.mark.parametrize('tool', ['ptq', 'mmdet_test'])
def test_user_error_in_the_hook_stays_one_line(tool, tmp_path, tiny_cfg):
    proc, _ = run_with_fault(tmp_path, tiny_cfg, tool, 'HawqUserError')
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert stderr_lines(proc) == [f'error: {CUDA_MESSAGE}']


def test_report_internal_errors_passes_what_is_not_a_bug():
    from mmdet_hawq.errors import (HawqInternalError, HawqUserError,
                                   report_internal_errors)

    def raising(error):
        @report_internal_errors
        def entry():
            raise error
        return entry

    for error in (HawqUserError('bad plan'), KeyboardInterrupt(),
                  SystemExit(3)):
        with pytest.raises(type(error)):
            raising(error)()
    with pytest.raises(HawqInternalError) as err:
        raising(ValueError('bug'))()
    assert str(err.value).endswith(' in entry: ValueError: bug')
    assert isinstance(err.value.__cause__, ValueError)
    # the wrapper's own frame is left out of the traceback
    assert err.value.details.count('File "') == 1


@pytest.mark.parametrize('error', [
    torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB '
                           '(GPU 0; 139.81 GiB total capacity)\nmore'),
    RuntimeError('[enforce fail at alloc_cpu.cpp:117] data. '
                 "DefaultCPUAllocator: can't allocate memory: you tried to "
                 'allocate 80000000000 bytes.')
])
def test_running_out_of_memory_is_one_user_error_line(error):
    """The size of the job, not a bug: one line saying what to lower."""
    from mmdet_hawq.errors import (HawqInternalError, HawqUserError,
                                   report_internal_errors)

    @report_internal_errors
    def entry(error=error):
        raise error

    with pytest.raises(HawqUserError) as err:
        entry()
    message = str(err.value)
    assert '\n' not in message and message.startswith(
        f'out of memory ({str(error).splitlines()[0][:160]}): lower the '
        'calibration batch size')
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # another RuntimeError is still a bug
    with pytest.raises(HawqInternalError):
        entry(RuntimeError('shape mismatch'))


def test_excepthook_reports_internal_errors(monkeypatch, capsys):
    from mmdet_hawq import errors
    seen = []
    monkeypatch.setattr(sys, 'excepthook',
                        lambda exc_type, exc, tb: seen.append(exc_type))
    monkeypatch.setattr(errors, '_in_process_group', lambda: False)
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    errors.install_excepthook()
    error = errors.HawqInternalError('internal error in mmdet-hawq at f.py:3'
                                     ' in g: TypeError: x', 'Traceback ...\n')
    with pytest.raises(SystemExit) as stop:
        sys.excepthook(type(error), error, None)
    assert stop.value.code == 1 and not seen
    assert capsys.readouterr().err == (
        'internal error in mmdet-hawq at f.py:3 in g: TypeError: x\n'
        'Traceback ...\n')
    monkeypatch.setenv(errors.TRACEBACK_ENV, '1')  # Python's own report
    sys.excepthook(type(error), error, None)
    assert seen == [errors.HawqInternalError]


def test_excepthook_ends_an_interrupt_once_work_is_saved(monkeypatch,
                                                         capsys):
    """Ctrl-C/SIGTERM in a program without run_cli (mmdet's test.py): one
    line once a step said what it saves, Python's own handling before."""
    from mmdet_hawq import errors
    seen = []
    monkeypatch.setattr(sys, 'excepthook',
                        lambda exc_type, exc, tb: seen.append(exc_type))
    monkeypatch.setattr(errors, '_in_process_group', lambda: False)
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(errors, '_interrupt_note', None)
    errors.install_excepthook()
    hook = sys.excepthook
    hook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert seen == [KeyboardInterrupt]  # no note: not the plugin's
    errors.set_interrupt_note(lambda: '3 samples are saved in DIR')
    for exc, status, name in ((KeyboardInterrupt(), 130, 'Ctrl-C (SIGINT)'),
                              (errors.Terminated(), 143, 'SIGTERM')):
        with pytest.raises(SystemExit) as stop:
            hook(type(exc), exc, None)
        assert stop.value.code == status
        assert capsys.readouterr().err == \
            f'error: interrupted by {name}: 3 samples are saved in DIR\n'
    assert seen == [KeyboardInterrupt]


@pytest.mark.skipif(os.name != 'posix', reason='POSIX signals')
def test_terminate_as_interrupt_only_replaces_the_default():
    from mmdet_hawq import errors
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with errors.terminate_as_interrupt():
            with pytest.raises(errors.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)  # a program's own: kept
        with errors.terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_no_pkg_resources_warning_with_warnings_on():
    proc = run_tool('tools/ptq.py', 'configs/detr/detr_tiny_shapes.py',
                    '--list-layers')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'pkg_resources' not in proc.stderr


def test_checkpoint_urls_are_not_checked_as_files():
    from mmdet_hawq.engine.checkpoint import is_local_path
    assert is_local_path('checkpoints/x.pth')
    assert is_local_path('/abs/x.pth')
    for url in ('https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth',
                'http://host/x.pth', 's3://bucket/x.pth',
                'torchvision://resnet50'):
        assert not is_local_path(url)


def saved_samples(cache) -> int:
    """Samples in the cache file so far (0 while none, or mid-write)."""
    for path in cache.glob('traces_*.json') if cache.is_dir() else []:
        try:
            return len(json.loads(path.read_text())['result']['samples'])
        except (ValueError, KeyError, TypeError, OSError):
            return 0
    return 0


@pytest.mark.skipif(os.name != 'posix', reason='POSIX signals')
@pytest.mark.parametrize('tool', ['ptq', 'mmdet_test'])
@pytest.mark.parametrize('signum,status', [(signal.SIGINT, 130),
                                           (signal.SIGTERM, 143)])
def test_interrupted_sensitivity_step_is_one_line(tiny_cfg, tmp_path,
                                                  signum, status, tool):
    cfg = write_cfg(tiny_cfg, tmp_path / 'cfg.py', hook=dict(
        metric='outquant', target_bits=4, save_packed=False,
        calibration=dict(num_images=4, batch_size=2),
        sensitivity=dict(tol=0.0, min_samples=10000, max_samples=10000)))
    work = tmp_path / 'w'
    cache = work / 'hawq' / 'cache'
    inputs = [cfg, tiny_cfg.load_from]
    before = sha256s(inputs)
    # a shell without job control (CI) starts background jobs with SIGINT
    # ignored, which Python then keeps: give the tool the default, as in a
    # terminal
    args = [str(cfg), '--work-dir', str(work)]
    # mmdet's test.py: the hook's own handlers and excepthook, no run_cli
    args = [MMDET_TEST, *mmdet_test_args(args)] if tool == 'mmdet_test' \
        else ['tools/ptq.py', *args]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT,
        env=MMDET_TEST_ENV if tool == 'mmdet_test' else USER_ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if saved_samples(cache):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == status, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: interrupted'), \
        err[-3000:]
    assert 'sensitivity sample(s) are saved in' in lines[0]
    assert str(cache) in lines[0] and 'rerun the same command' in lines[0]
    assert sha256s(inputs) == before

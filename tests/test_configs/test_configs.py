"""Every shipped config parses, and its DistillSensitivityHook builds with
the paper's settings for its row."""
import glob
import os.path as osp
import re

import pytest
from mmengine.config import Config

from mmdet.registry import HOOKS
from mmdet_hawq.api import ActivationSettings

from ..conftest import ROOT

CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*', '*_*bit.py')))
MODELS = ('detr_r50', 'detr_tiny_shapes', 'dino_r50', 'dino_tiny_shapes',
          'deformable_detr_r50', 'deformable_detr_tiny_shapes',
          'conditional_detr_r50', 'dab_detr_r50', 'ddq_detr_r50')
FAMILY = {'detr': 'DETR', 'dino': 'DINO', 'deformable_detr': 'DeformableDETR',
          'conditional_detr': 'ConditionalDETR', 'dab_detr': 'DABDETR',
          'ddq_detr': 'DDQDETR'}


def test_all_table1_rows_exist():
    names = {osp.basename(c) for c in CONFIGS}
    for model in MODELS:
        assert f'{model}_uniform_8bit.py' in names
        for metric in ('uniform', 'losssen', 'outfloat', 'outquant'):
            for bits in (6, 5, 4):
                assert f'{model}_{metric}_{bits}bit.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_builds_its_hook(path):
    cfg = Config.fromfile(path)
    assert 'mmdet_hawq' in cfg.custom_imports['imports']
    hooks = [h for h in cfg.custom_hooks
             if h['type'] == 'DistillSensitivityHook']
    assert len(hooks) == 1
    hook = HOOKS.build(dict(hooks[0])).settings
    model, metric, bits = re.match(
        r'(\w+?)_(uniform|losssen|outfloat|outquant)_(\d)bit\.py',
        osp.basename(path)).groups()
    assert model in MODELS
    family = re.match(r'(\w+?)_(r50|tiny_shapes)$', model).group(1)
    assert cfg.model.type == FAMILY[family]
    # each config lives in its family's folder, as mmdet's do
    assert osp.basename(osp.dirname(path)) == family
    assert hook.metric == metric
    if metric == 'uniform':
        assert hook.bits == int(bits)
    else:
        assert hook.target_bits == int(bits)
        assert hook.bit_range == ((4, 7) if bits == '6' else (3, 6))
    if model.endswith('_r50'):
        assert cfg.model.backbone.depth == 50
        assert cfg.model.backbone.init_cfg is None  # no download at build


GPTQ_CONFIGS = sorted(glob.glob(
    osp.join(ROOT, 'configs', '*', '*bit_gptq.py')))


@pytest.mark.parametrize('model', [
    'detr_r50', 'dino_r50', 'deformable_detr_r50', 'ddq_detr_r50',
    'detr_tiny_shapes', 'dino_tiny_shapes', 'deformable_detr_tiny_shapes'])
@pytest.mark.parametrize('bits', [4, 3])
def test_gptq_configs_cover_the_small_models_and_r50(model, bits):
    """Each model has an Out Sen Quant GPTQ config at 4 and 3 bits, in its
    family folder, whose hook rounds with GPTQ at that budget."""
    (path, ) = [c for c in GPTQ_CONFIGS
                if osp.basename(c) == f'{model}_outquant_{bits}bit_gptq.py']
    family = re.match(r'(\w+?)_(r50|tiny_shapes)$', model).group(1)
    assert osp.basename(osp.dirname(path)) == family
    (hook_cfg, ) = [h for h in Config.fromfile(path).custom_hooks
                    if h['type'] == 'DistillSensitivityHook']
    s = HOOKS.build(dict(hook_cfg)).settings
    assert (s.metric, s.target_bits, s.rounding) == ('outquant', bits,
                                                     'gptq')


@pytest.mark.parametrize('path', GPTQ_CONFIGS, ids=osp.basename)
def test_gptq_config_is_its_base_with_gptq_rounding(path):
    cfg = Config.fromfile(path)
    model, bits = re.match(r'(\w+?)_outquant_(\d)bit_gptq\.py',
                           osp.basename(path)).groups()
    base = Config.fromfile(osp.join(osp.dirname(path),
                                    f'{model}_outquant_4bit.py'))
    assert cfg.model == base.model
    (hook_cfg, ) = [h for h in cfg.custom_hooks
                    if h['type'] == 'DistillSensitivityHook']
    hook = HOOKS.build(dict(hook_cfg)).settings
    assert hook.metric == 'outquant' and hook.rounding == 'gptq'
    assert hook.target_bits == int(bits)
    assert hook.bit_range == ((3, 6) if bits == '4' else (2, 5))


ACTIVATION_CONFIGS = sorted(glob.glob(
    osp.join(ROOT, 'configs', '*', '*_w[48]a8.py')))


def test_activation_configs_cover_the_small_models_and_r50():
    names = {osp.basename(c) for c in ACTIVATION_CONFIGS}
    assert names == {f'{m}_{size}_{v}.py' for m in
                     ('detr', 'dino', 'deformable_detr')
                     for size in ('tiny_shapes', 'r50')
                     for v in ('w8a8', 'w4a8')}


@pytest.mark.parametrize('path', ACTIVATION_CONFIGS, ids=osp.basename)
def test_activation_config_quantizes_the_inputs_at_8_bits(path):
    cfg = Config.fromfile(path)
    (hook_cfg, ) = [h for h in cfg.custom_hooks
                    if h['type'] == 'DistillSensitivityHook']
    s = HOOKS.build(dict(hook_cfg)).settings
    assert s.activations == ActivationSettings(bits=8, method='mse',
                                               sensitivity=True)
    if path.endswith('w8a8.py'):
        assert (s.metric, s.bits) == ('uniform', 8)
    else:
        assert (s.metric, s.target_bits, s.rounding) == ('outquant', 4,
                                                         'gptq')

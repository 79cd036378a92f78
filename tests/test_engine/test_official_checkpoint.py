"""Loading through the Runner: the official DETR file taken as it is (and
said in the log), every load of a config with the hook strict."""
import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import convert_official_detr
from mmdet_hawq.quant import apply_plan, quantizable_weights, uniform_plan
from mmdet_hawq.quant.packing import pack_state_dict
from ..conftest import ROOT
from ..test_models.official_state import random_official_state

HOOK = dict(type='DistillSensitivityHook', metric='uniform', bits=8)


def load(cfg: Config, work_dir, path: str, hook: bool = True) -> Runner:
    """A Runner of ``cfg`` (with the hook or none) that loaded ``path`` as
    its ``load_from``."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.load_from = path
    cfg.custom_hooks = [HOOK] if hook else []
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    return runner


def log_text(runner: Runner) -> str:
    return ''.join(open(p).read()
                   for p in glob.glob(osp.join(runner.log_dir, '*.log')))


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """(file, state) of a random official-format DETR-R50 checkpoint."""
    state = random_official_state(seed=1)
    path = str(tmp_path_factory.mktemp('official') / 'detr-r50-e632da11.pth')
    torch.save({'model': state}, path)
    return path, state


@pytest.mark.parametrize('hook', [True, False])
def test_detr_r50_configs_take_the_official_file(official, tmp_path, hook):
    path, state = official
    cfg = Config.fromfile(osp.join(ROOT, 'configs',
                                   'detr', 'detr_r50_uniform_8bit.py'))
    runner = load(cfg, tmp_path, path, hook)
    expected = convert_official_detr(state)
    for name, tensor in runner.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert ('official facebookresearch/detr checkpoint, converted to mmdet '
            'DETR names in memory') in log_text(runner)
    if hook:  # a checkpoint from another loader: the hook converts it
        ckpt = {'model': state}
        runner.call_hook('after_load_checkpoint', checkpoint=ckpt)
        assert set(ckpt['state_dict']) == set(expected)


def save(tmp_path, state, name='ckpt.pth') -> str:
    path = str(tmp_path / name)
    torch.save(dict(state_dict=state, meta={}), path)
    return path


def load_error(tiny_cfg, tmp_path, path) -> str:
    with pytest.raises(HawqUserError) as err:
        load(tiny_cfg, tmp_path / 'work', path)
    msg = str(err.value)
    assert path in msg and '\n' not in msg
    return msg


def test_a_checkpoint_of_no_known_format_is_one_clear_error(tiny_cfg,
                                                            tmp_path):
    path = save(tmp_path, {f'net.{i}.weight': torch.ones(2)
                           for i in range(9)})
    msg = load_error(tiny_cfg, tmp_path, path)
    assert 'matches neither the model' in msg and 'official' in msg


def test_the_official_file_on_another_model_is_one_clear_error(
        tiny_cfg, tmp_path, official):
    msg = load_error(tiny_cfg, tmp_path, official[0])
    assert 'does not fit the model' in msg and 'shape mismatch' in msg
    assert '... and' in msg  # long lists are cut


def test_missing_unexpected_and_misshapen_keys_are_listed(tiny_cfg, tmp_path,
                                                          build_tiny_model):
    state = build_tiny_model().state_dict()
    state.pop('query_embedding.weight')
    state['extra.weight'] = torch.ones(1)
    state['bbox_head.fc_reg.bias'] = torch.ones(5)
    msg = load_error(tiny_cfg, tmp_path, save(tmp_path, state))
    assert '1 missing key(s) (query_embedding.weight)' in msg
    assert '1 unexpected key(s) (extra.weight)' in msg
    assert 'bbox_head.fc_reg.bias (5,) vs model (4,)' in msg


def test_own_checkpoints_load_strictly(tiny_cfg, tmp_path, build_tiny_model):
    model = build_tiny_model()
    # DDP-saved names
    wrapped = {f'module.{k}': v for k, v in model.state_dict().items()}
    runner = load(tiny_cfg, tmp_path / 'ddp',
                  save(tmp_path, wrapped, 'ddp.pth'))
    for name, tensor in runner.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # a packed low-bit checkpoint of the plugin
    weights = quantizable_weights(model)
    plan = uniform_plan(weights, 4)
    packed = pack_state_dict(model, apply_plan(model, plan).applied, plan)
    path = str(tmp_path / 'packed.pth')
    torch.save(packed, path)
    runner = load(tiny_cfg, tmp_path / 'packed', path)
    for name, tensor in runner.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_shipped_checkpoint_loads_strictly(tmp_path):
    cfg = Config.fromfile(osp.join(ROOT, 'configs',
                                   'detr', 'detr_tiny_shapes_uniform_8bit.py'))
    ckpt = osp.join(ROOT, cfg.load_from)
    runner = load(cfg, tmp_path, ckpt)
    state = torch.load(ckpt, weights_only=True)['state_dict']
    for name, tensor in runner.model.state_dict().items():
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name


def test_the_official_url_is_converted_like_the_file(monkeypatch, official):
    from mmengine.runner import CheckpointLoader
    from mmengine.runner import checkpoint as mm_checkpoint
    path, state = official
    urls = []

    def fake_download(url, map_location=None):  # no network in tests
        urls.append(url)
        return torch.load(path, map_location=map_location, weights_only=True)

    monkeypatch.setattr(mm_checkpoint, 'load_from_http', fake_download)
    url = 'https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth'
    ckpt = CheckpointLoader.load_checkpoint(url)
    assert urls == [url]
    assert ckpt['meta']['converted_from'] == 'facebookresearch/detr'
    expected = convert_official_detr(state)
    assert set(ckpt['state_dict']) == set(expected)
    assert torch.equal(ckpt['state_dict']['bbox_head.fc_cls.weight'],
                       expected['bbox_head.fc_cls.weight'])

"""Shared fixtures: a tiny shapes dataset and a tiny DETR built from the
project's real mmdet config, shrunk. Nothing here touches the network."""
import copy
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from mmdet.utils import register_all_modules
from mmdet_hawq.datasets import ShapesSpec, generate_shapes_dataset
from mmdet_hawq.models import ADAPTERS, detector_family
from mmdet_hawq.models.adapters import DeformableDETRAdapter

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: The folders of scripts: user commands, benchmarks, experiments and
#: release checks.
SCRIPT_DIRS = ('tools', 'benchmarks', 'experiments', 'release')


def script_path(name: str) -> str:
    """The path of the script called ``name`` in one of :data:`SCRIPT_DIRS`."""
    for folder in SCRIPT_DIRS:
        path = osp.join(ROOT, folder, name)
        if osp.isfile(path):
            return path
    raise FileNotFoundError(f'no script {name} in {SCRIPT_DIRS}')
TINY_SPEC = ShapesSpec(image_size=64, min_size=12, max_size=30, max_objects=3)

register_all_modules(init_default_scope=True)

if os.environ.get('PYTEST_XDIST_WORKER'):
    # `make test` runs two pytest-xdist workers on two cores: one intra-op
    # thread each, so that they do not contend for the cores
    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA GPU (skipped without one); '
        '`pytest -m cuda tests` runs only these (release/gpu_check.sh)')
    config.addinivalue_line(
        'markers', 'slow: an integration test (a tool in a subprocess, or '
        "the hook in mmengine's Runner on every family member); "
        '`pytest -m "not slow" tests` leaves them out')


def pytest_addoption(parser) -> None:
    parser.addoption(
        '--gpu-device', default='cuda',
        help="the device tests/test_engine/test_cuda.py compares with the "
        "CPU (default cuda); 'cpu' dry-runs those tests without a GPU, the "
        'CPU against itself: it shows that the tests run, not that the GPU '
        'agrees')


#: Skips a test where no CUDA GPU is visible.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason='needs a CUDA GPU')


@pytest.fixture
def gpu_device(request) -> str:
    """The device the GPU tests run on (``--gpu-device``); skips the test
    where it is CUDA and no GPU is visible."""
    device = request.config.getoption('--gpu-device')
    if device.startswith('cuda') and not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU (--gpu-device cpu dry-runs it)')
    return device


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
    """8 train and 4 val images of 64x64."""
    root = str(tmp_path_factory.mktemp('shapes'))
    generate_shapes_dataset(root, num_train=8, num_val=4, seed=3,
                            spec=TINY_SPEC)
    return root


def shrink(cfg: Config, data_root: str) -> Config:
    """The small DETR config made tinier (2 decoder layers kept)."""
    cfg = copy.deepcopy(cfg)
    d = 32
    attn = dict(embed_dims=d, num_heads=2)
    ffn = dict(embed_dims=d, feedforward_channels=64)
    cfg.merge_from_dict(dict(model=dict(
        num_queries=6,
        backbone=dict(base_channels=8, num_stages=2, out_indices=(1, ),
                      strides=(1, 2), dilations=(1, 1), init_cfg=None),
        neck=dict(in_channels=[16], out_channels=d),
        encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=attn,
                                                  ffn_cfg=ffn)),
        decoder=dict(num_layers=2, layer_cfg=dict(
            self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=ffn)),
        positional_encoding=dict(num_feats=d // 2),
        bbox_head=dict(embed_dims=d),
        test_cfg=dict(max_per_img=6))))
    for split in ('train', 'val', 'test'):
        dl = cfg[f'{split}_dataloader']
        dl.dataset.data_root = data_root + '/'
        dl.batch_size = 4
        dl.num_workers = 0
        dl.pop('persistent_workers', None)
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = osp.join(data_root, 'annotations',
                                    'instances_val.json')
    return cfg


@pytest.fixture(scope='session')
def tiny_cfg(tiny_data, tmp_path_factory) -> Config:
    """Config of a tiny DETR on the tiny data, with a saved random-init
    checkpoint as ``load_from``."""
    from mmdet.registry import MODELS
    path, _ = TEST_CONFIGS['detr']
    cfg = shrink(Config.fromfile(path), tiny_data)
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    ckpt = str(tmp_path_factory.mktemp('ckpt') / 'tiny.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    cfg.load_from = ckpt
    cfg.work_dir = str(tmp_path_factory.mktemp('work'))
    return cfg


@pytest.fixture(scope='module')
def cfg_file(tiny_cfg, tmp_path_factory) -> str:
    """The tiny DETR config dumped to a file (tools take a config path)."""
    path = str(tmp_path_factory.mktemp('tool_cfg') / 'tiny.py')
    tiny_cfg.dump(path)
    return path


def mmdet_config(rel: str) -> str:
    """Path of one of mmdet's own configs (installed with the package)."""
    import mmdet
    return osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', rel)


def config_path(config: str) -> str:
    """A test config's file: ``mmdet::rel`` is one of mmdet's own configs,
    anything else a path in the project."""
    if config.startswith('mmdet::'):
        return mmdet_config(config[len('mmdet::'):])
    return osp.join(ROOT, config)


#: The small configs every family adapter names (the families the suite
#: covers): test name → (config file, model overrides).
TEST_CONFIGS = {name: (config_path(config), extra)
                for adapter in ADAPTERS
                for name, (config, extra) in adapter.test_configs.items()}
#: The members built by :func:`shrink_family`; the tiny DETR is
#: :func:`tiny_cfg`, shrunk narrower by :func:`shrink`.
FAMILY_CONFIGS = {n: c for n, c in TEST_CONFIGS.items() if n != 'detr'}


def shrink_family(name: str, tiny: Config) -> Config:
    """A DETR-family config shrunk like the tiny DETR, on its data."""
    path, extra = FAMILY_CONFIGS[name]
    cfg = Config.fromfile(path)
    # mmdet's DINO and Conditional decoders and two-stage proposals fix 128
    # position features per coordinate: the width stays 256 (the rest shrinks)
    d = 256
    ffn = dict(embed_dims=d, feedforward_channels=64)
    backbone = dict(type='ResNet', depth=18, base_channels=8, num_stages=2,
                    strides=(1, 2), dilations=(1, 1), frozen_stages=-1,
                    norm_cfg=dict(type='BN', requires_grad=True),
                    norm_eval=False, init_cfg=None)
    from mmdet.registry import MODELS
    adapter = detector_family(MODELS.get(cfg.model.type))
    if isinstance(adapter, DeformableDETRAdapter):
        msda = dict(embed_dims=d, num_heads=2, num_levels=2, num_points=2)
        model = dict(
            num_feature_levels=2,
            backbone=dict(out_indices=(0, 1), **backbone),
            neck=dict(in_channels=[8, 16], out_channels=d, num_outs=2,
                      norm_cfg=dict(type='GN', num_groups=8)),
            encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=msda,
                                                      ffn_cfg=ffn)),
            decoder=dict(num_layers=2, layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=d, num_heads=2),
                cross_attn_cfg=msda, ffn_cfg=ffn)))
    else:
        attn = dict(embed_dims=d, num_heads=2)
        model = dict(
            backbone=dict(out_indices=(1, ), **backbone),
            neck=dict(in_channels=[16], out_channels=d),
            encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=attn,
                                                      ffn_cfg=ffn)),
            decoder=dict(num_layers=2, layer_cfg=dict(
                self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=ffn)))
    model.update(num_queries=6, positional_encoding=dict(num_feats=d // 2),
                 bbox_head=dict(num_classes=4, embed_dims=d),
                 test_cfg=dict(max_per_img=6), **extra)
    cfg.merge_from_dict(dict(model=model))
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        cfg[key] = copy.deepcopy(tiny[key])
    cfg.default_scope = 'mmdet'
    return cfg


@pytest.fixture(scope='session')
def family_cfg(tiny_cfg, tmp_path_factory):
    """``family_cfg(name)``: the shrunk config of a DETR-family member with a
    saved random-init checkpoint as ``load_from`` (built once per name)."""
    from mmdet.registry import MODELS
    built = {}

    def get(name: str) -> Config:
        if name not in built:
            cfg = shrink_family(name, tiny_cfg)
            torch.manual_seed(0)
            model = MODELS.build(copy.deepcopy(cfg.model))
            model.init_weights()
            ckpt = str(tmp_path_factory.mktemp(name) / 'init.pth')
            torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
            cfg.load_from = ckpt
            cfg.work_dir = str(tmp_path_factory.mktemp(f'{name}_work'))
            built[name] = cfg
        return copy.deepcopy(built[name])

    return get


def build_from(cfg: Config) -> torch.nn.Module:
    """The config's model with its ``load_from`` weights, in eval mode."""
    from mmdet.registry import MODELS
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.load_state_dict(torch.load(cfg.load_from)['state_dict'],
                          strict=True)
    return model.eval()


@pytest.fixture
def build_tiny_model(tiny_cfg):
    """Build the tiny DETR with the checkpoint's weights, in eval mode."""

    def build():
        return build_from(tiny_cfg)

    return build


def run_tool(*args, cwd=ROOT, timeout=600, env=None):
    """Run a Python tool of the project (``env``: extra environment
    variables); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_table1(cfg: Config, tmp_path, *args: str, name: str = 'tiny'):
    """``experiments/table1.py`` on ``cfg`` (dumped to a file, its
    ``load_from``
    as the checkpoint) with a tiny calibration budget and extra ``args``;
    asserts it exits 0. Returns (config file, work dir, table1.json rows).
    """
    import json
    cfg_file = tmp_path / f'{name}.py'
    cfg.dump(str(cfg_file))
    work = tmp_path / 'table'
    proc = run_tool('experiments/table1.py', str(cfg_file), '--checkpoint',
                    cfg.load_from, '--work-dir', str(work), '--num-images',
                    '4', '--hutchinson-samples', '2', '--gn-samples', '2',
                    '--targets', '3', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg_file, work, json.load(open(work / 'table1.json'))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Show the hook's own traceback when mmengine's ``call_hook`` re-raised
    a TypeError ``from None`` (which hides where it came from)."""
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo else None
    inner = getattr(error, '__context__', None)
    if report.failed and inner is not None and getattr(
            error, '__suppress_context__', False):
        import traceback
        report.sections.append(('hidden cause', ''.join(
            traceback.format_exception(inner))))

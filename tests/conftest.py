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

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_SPEC = ShapesSpec(image_size=64, min_size=12, max_size=30, max_objects=3)

register_all_modules(init_default_scope=True)


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
    cfg = shrink(Config.fromfile(osp.join(ROOT, 'configs',
                                          'detr_tiny_shapes.py')), tiny_data)
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    ckpt = str(tmp_path_factory.mktemp('ckpt') / 'tiny.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    cfg.load_from = ckpt
    cfg.work_dir = str(tmp_path_factory.mktemp('work'))
    return cfg


@pytest.fixture
def build_tiny_model(tiny_cfg):
    """Build the tiny DETR with the checkpoint's weights, in eval mode."""
    from mmdet.registry import MODELS

    def build():
        model = MODELS.build(copy.deepcopy(tiny_cfg.model))
        state = torch.load(tiny_cfg.load_from)['state_dict']
        model.load_state_dict(state, strict=True)
        return model.eval()

    return build


def run_tool(*args, cwd=ROOT, timeout=600, env=None):
    """Run a Python tool of the project (``env``: extra environment
    variables); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

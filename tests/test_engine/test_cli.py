"""engine/cli.py: the steps every script shares, and their one-line
errors."""
import json
import os
import os.path as osp
from types import SimpleNamespace

import numpy as np
import pytest

from mmdet_hawq.engine.cli import (check_checkpoint, check_positive,
                                   check_work_dir, config_syntax_error,
                                   read_config, write_json)
from mmdet_hawq.errors import HawqUserError

from ..conftest import ROOT


def test_read_config_merges_the_overrides():
    path = osp.join(ROOT, 'configs', 'detr', 'detr_tiny_shapes.py')
    plain = read_config(path)
    cfg = read_config(path, {'model.num_queries': 7,
                             'test_dataloader.batch_size': 3})
    assert (cfg.model.num_queries, cfg.test_dataloader.batch_size) == (7, 3)
    assert plain.model.num_queries != 7
    assert read_config(path, None).model == plain.model


def test_read_config_names_the_base_file_with_the_syntax_error(tmp_path):
    (tmp_path / 'base.py').write_text('x = 1\ny = (\n')
    top = tmp_path / 'top.py'
    top.write_text("_base_ = './base.py'\nz = 2\n")
    where, line, _ = config_syntax_error(str(top))
    assert (osp.normpath(where), line) == (str(tmp_path / 'base.py'), 2)
    with pytest.raises(HawqUserError, match=r"base\.py' has a syntax error "
                       r'at line 2'):
        read_config(str(top))
    with pytest.raises(HawqUserError, match='nope.py.* does not exist'):
        read_config(str(tmp_path / 'nope.py'))


def test_check_checkpoint(tmp_path):
    ckpt = tmp_path / 'a.pth'
    ckpt.write_bytes(b'x')
    assert check_checkpoint(str(ckpt)) == str(ckpt)
    url = 'https://example.org/a.pth'
    assert check_checkpoint(url) == url  # checked by its loader
    with pytest.raises(HawqUserError) as err:
        check_checkpoint(str(tmp_path / 'b.pth'), '--checkpoint')
    assert str(err.value) == (
        f"checkpoint file '{tmp_path / 'b.pth'}' does not exist: pass an "
        'existing .pth file or a URL with --checkpoint')
    with pytest.raises(HawqUserError, match=r'pass an existing \.pth file$'):
        check_checkpoint(url, urls=False)


def test_write_json_makes_the_folder_and_writes_numpy_scalars(tmp_path):
    path = str(tmp_path / 'a' / 'b' / 'r.json')
    assert write_json(path, dict(x=np.float32(0.5), n=[1, 2])) == path
    with open(path) as f:
        assert json.load(f) == dict(x=0.5, n=[1, 2])


def test_check_work_dir(tmp_path):
    assert check_work_dir(str(tmp_path / 'w')) == str(tmp_path / 'w')
    assert osp.isdir(tmp_path / 'w') and os.listdir(tmp_path / 'w') == []
    (tmp_path / 'file').write_text('')
    with pytest.raises(HawqUserError, match='cannot be written'):
        check_work_dir(str(tmp_path / 'file' / 'w'))


def test_check_positive():
    check_positive(SimpleNamespace(a=1, b=None), ('a', 'b'))
    with pytest.raises(HawqUserError,
                       match='--max-images takes a positive integer, not 0'):
        check_positive(SimpleNamespace(max_images=0), ('max_images', ))

import numpy as np
import pytest
import torch
from mmengine.runner import CheckpointLoader

from mmdet_hawq.engine import load_checkpoint_file
from mmdet_hawq.errors import HawqUserError


def test_missing_file_is_one_clear_error(tmp_path):
    path = str(tmp_path / 'nope.pth')
    with pytest.raises(HawqUserError, match='does not exist') as err:
        CheckpointLoader.load_checkpoint(path)
    assert path in str(err.value) and '\n' not in str(err.value)


def test_corrupted_file_is_one_clear_error(tmp_path):
    path = tmp_path / 'broken.pth'
    torch.save(dict(state_dict={'w': torch.ones(3)}), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(HawqUserError, match='corrupted') as err:
        load_checkpoint_file(str(path))
    assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_mmengine_style_meta_loads_under_torch_2_6_defaults(tmp_path):
    # numpy objects in meta are what torch>=2.6's weights_only rejects
    path = tmp_path / 'meta.pth'
    torch.save(dict(state_dict={'w': torch.ones(2)},
                    meta=dict(hist=np.arange(3), seed=np.int64(4))), path)
    with pytest.raises(Exception):
        torch.load(path)  # what mmengine 0.10.7 does
    ckpt = CheckpointLoader.load_checkpoint(str(path))
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))

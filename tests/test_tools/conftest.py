"""Fixtures of the tool tests."""
import pytest


@pytest.fixture(scope='module')
def cfg_file(tiny_cfg, tmp_path_factory) -> str:
    """The tiny DETR config dumped to a file (tools take a config path)."""
    path = str(tmp_path_factory.mktemp('tool_cfg') / 'tiny.py')
    tiny_cfg.dump(path)
    return path

"""The set-up's setuptools pin must not put a deprecation warning at the top
of every command (mmdet's own tools included)."""
import os
import site
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PTH = 'quiet_pkg_resources.pth'


def test_no_pkg_resources_warning_when_mmengine_is_imported():
    installed = [d for d in site.getsitepackages()
                 if os.path.isfile(os.path.join(d, PTH))]
    if not installed:
        pytest.skip(f'{PTH} is not installed: not the project set-up '
                    '(make venv)')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    proc = subprocess.run(
        # what mmengine runs for custom imports and mmdet's tools
        [sys.executable, '-c',
         "from mmengine.utils import is_installed; is_installed('mmdet')"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'pkg_resources' not in proc.stderr

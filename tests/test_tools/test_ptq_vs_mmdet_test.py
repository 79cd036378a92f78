"""The same quantization config through tools/ptq.py and through mmdet's own
test script gives the same plan, bit for bit, and the same mAP (a 60-image
val subset and a small calibration budget, to stay fast). The two runs use
separate work dirs, so each computes its traces from scratch."""
import os.path as osp
import re

import pytest

from ..conftest import ROOT, run_tool

pytestmark = pytest.mark.slow

VAL = osp.join(ROOT, 'data', 'shapes', 'annotations', 'instances_val.json')
SUBSET = ['test_dataloader.dataset.indices=60',
          'custom_hooks.0.calibration.num_images=8',
          'custom_hooks.0.sensitivity.min_samples=3',
          'custom_hooks.0.sensitivity.max_samples=3']


@pytest.mark.skipif(not osp.isfile(VAL), reason='run `make data` first')
def test_ptq_and_mmdet_test_script_agree(tmp_path):
    import mmdet
    cfg = 'configs/detr/detr_tiny_shapes_outquant_4bit.py'
    ptq = run_tool('tools/ptq.py', cfg, '--work-dir', str(tmp_path / 'a'),
                   '--cfg-options', *SUBSET)
    assert ptq.returncode == 0, ptq.stderr[-3000:]
    m_ptq = float(re.search(r'quantized  bbox mAP ([0-9.]+)',
                            ptq.stdout).group(1))
    test_py = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools',
                       'test.py')
    ref = run_tool(test_py, cfg, 'checkpoints/detr_tiny_shapes.pth',
                   '--work-dir', str(tmp_path / 'b'), '--cfg-options',
                   *SUBSET)
    assert ref.returncode == 0, ref.stderr[-3000:]
    m_ref = float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', ref.stdout)[-1])
    assert m_ptq == pytest.approx(m_ref, abs=1e-4)
    plans = [(tmp_path / d / 'hawq' / 'plan.json').read_text()
             for d in ('a', 'b')]
    assert plans[0] == plans[1]
    # CocoMetric scores the 60 images against all 500 val images' ground
    # truth, so even the float model gets only ~60/500 of its full mAP
    assert m_ptq > 0.02  # a trained model, not an untrained one

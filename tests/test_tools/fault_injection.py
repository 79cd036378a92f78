"""Test helper, not a test: ``tools/ptq.py`` with a fault on rank 1.

``HAWQ_FAULT=kill`` makes rank 1 kill itself (SIGKILL) at its first
sensitivity sample; ``HAWQ_FAULT=hang`` makes it sleep there for an hour.
Used by ``test_dist_ptq.py`` under torchrun.
"""
import os
import os.path as osp
import runpy
import signal
import sys
import time

from mmdet_hawq.sensitivity import objectives

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
_sample = objectives.DistillationObjective.gauss_newton_sample


def _faulty_sample(self, index, generator):
    if os.environ.get('RANK') == '1':
        if os.environ['HAWQ_FAULT'] == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return _sample(self, index, generator)


if __name__ == '__main__':
    objectives.DistillationObjective.gauss_newton_sample = _faulty_sample
    ptq = osp.join(ROOT, 'tools', 'ptq.py')
    sys.argv = [ptq] + sys.argv[1:]
    runpy.run_path(ptq, run_name='__main__')

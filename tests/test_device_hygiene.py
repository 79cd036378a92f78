"""A CPU check for host/device bugs that only a GPU run would show.

On the CPU every tensor is a host tensor, so ``tensor.numpy()`` of a model's
tensor, a generator or a tensor made without ``device=`` inside the
estimators all work here and fail (or copy every step) on CUDA. This test
reads the package's and the tools' source and flags the three patterns:

* ``X.numpy()`` where ``X`` was not moved to the host in the same expression
  (``.cpu()``, ``.to('cpu', ...)``) — the crash that stopped the main job on
  CUDA (``quant/packing.py::pack_codes``);
* ``torch.Generator()`` without a device — draws made on the host and copied
  over, once per weight and sample;
* a tensor factory without ``device=`` in the estimators' modules
  (``sensitivity/``, ``quant/``, ``deploy/``), where it would meet tensors
  on the model's device.

Lines that are host-side by design are listed in :data:`HOST_BY_DESIGN`
with the reason; a listed line that no longer matches fails too, so the list
cannot go stale.
"""
import ast
import os
import os.path as osp
from typing import List, Set, Tuple

import pytest

import mmdet_hawq

PACKAGE = osp.dirname(mmdet_hawq.__file__)
ROOT = osp.dirname(PACKAGE)
FACTORIES = {'zeros', 'ones', 'full', 'empty', 'arange', 'tensor', 'randint',
             'randn', 'rand', 'eye', 'linspace', 'as_tensor'}
#: Folders whose tensor factories must name a device.
DEVICE_FOLDERS = ('api', 'sensitivity', 'quant', 'deploy', 'models')
#: (file under mmdet_hawq/, source line stripped) → why it is host-side.
HOST_BY_DESIGN = {
    ('sensitivity/traces.py',
     'numels = torch.tensor(result.numels, dtype=torch.float64)'):
    'divides the host copy of a sample, once per sample',
    ('deploy/onnx_export.py',
     'image = torch.zeros(1, 3, *wrapper.input_shape)'):
    'the export traces a CPU copy of the model',
    ('deploy/onnx_runtime.py',
     'scores = torch.as_tensor(np.asarray(scores))'):
    "ONNX Runtime's outputs are host arrays",
    ('deploy/onnx_runtime.py', 'boxes = torch.as_tensor(np.asarray(boxes))'):
    "ONNX Runtime's outputs are host arrays",
    ('models/backbone_pretrainer.py',
     'target = torch.full((b, h, w), num_classes, dtype=torch.long)'):
    'cell targets are built from host boxes, then moved to the logits',
    ('models/backbone_pretrainer.py',
     'ys = (torch.arange(h) + 0.5) * ih / h'): 'as the targets',
    ('models/backbone_pretrainer.py',
     'xs = (torch.arange(w) + 0.5) * iw / w'): 'as the targets',
    ('models/adapters/ddq_detr.py',
     "return g.op('Constant', value_t=torch.tensor(value, dtype=dtype))"):
    'a constant of the ONNX graph',
}


def _moved_to_host(node: ast.AST) -> bool:
    """Whether the expression under ``node`` calls ``.cpu()`` or
    ``.to('cpu', ...)`` anywhere."""
    for sub in ast.walk(node):
        if not (isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Attribute)):
            continue
        if sub.func.attr == 'cpu' or (
                sub.func.attr == 'to' and sub.args
                and isinstance(sub.args[0], ast.Constant)
                and sub.args[0].value == 'cpu'):
            return True
    return False


def _is_torch_call(node: ast.Call, names: Set[str]) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr in names
            and isinstance(f.value, ast.Name) and f.value.id == 'torch')


def findings(source: str, rel: str) -> List[Tuple[int, str, str]]:
    """(line, source line, what) for each host/device pattern in
    ``source`` (the file ``rel`` under the package)."""
    lines = source.splitlines()
    found = []
    device_folder = rel.split('/')[0] in DEVICE_FOLDERS
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        kwargs = {k.arg for k in node.keywords}
        what = None
        if isinstance(node.func, ast.Attribute) and node.func.attr == \
                'numpy' and not _moved_to_host(node.func.value):
            what = '.numpy() of a tensor not moved to the host first'
        elif _is_torch_call(node, {'Generator'}) and not node.args and \
                'device' not in kwargs:
            what = 'torch.Generator() without a device'
        elif device_folder and _is_torch_call(node, FACTORIES) and \
                'device' not in kwargs:
            what = f'torch.{node.func.attr}() without device='
        elif device_folder and _is_torch_call(node, {'from_numpy'}):
            what = 'torch.from_numpy() makes a host tensor'
        if what:
            found.append((node.lineno, lines[node.lineno - 1].strip(), what))
    return found


def package_findings() -> Tuple[List[str], Set[Tuple[str, str]]]:
    """Unlisted findings in the package and tools/ as 'file:line: what:
    code', and the listed lines that matched."""
    bad, matched = [], set()
    for top, prefix in ((PACKAGE, ''), (osp.join(ROOT, 'tools'), 'tools/')):
        for folder, _, files in sorted(os.walk(top)):
            for name in sorted(f for f in files if f.endswith('.py')):
                path = osp.join(folder, name)
                rel = prefix + osp.relpath(path, top).replace(osp.sep, '/')
                with open(path) as f:
                    source = f.read()
                for line, code, what in findings(source, rel):
                    if (rel, code) in HOST_BY_DESIGN:
                        matched.add((rel, code))
                    else:
                        where = rel if prefix else f'mmdet_hawq/{rel}'
                        bad.append(f'{where}:{line}: {what}: {code}')
    return bad, matched


def test_package_has_no_host_only_calls_on_device_tensors():
    bad, _ = package_findings()
    assert not bad, 'host/device hazards:\n' + '\n'.join(bad)


def test_host_by_design_list_is_current():
    _, matched = package_findings()
    assert matched == set(HOST_BY_DESIGN), \
        f'stale entries: {set(HOST_BY_DESIGN) - matched}'


OLD_PACK_CODES = '''
def pack_codes(codes, bits):
    u = (codes.reshape(-1).to(torch.int16) + qmax(bits)).numpy().astype(
        np.uint8)
    return u
'''


def test_flags_the_pack_codes_line_that_crashed_on_cuda():
    """The check fails on ``pack_codes`` as it was (f64220f)."""
    found = findings(OLD_PACK_CODES, 'quant/packing.py')
    assert [(line, what) for line, _, what in found] == [
        (3, '.numpy() of a tensor not moved to the host first')]


@pytest.mark.parametrize('code', [
    'x.cpu().numpy()', "x.detach().to('cpu', torch.int16).numpy()",
    'x.detach().cpu().reshape(-1).numpy()'
])
def test_host_copies_pass(code):
    assert findings(code, 'quant/packing.py') == []


@pytest.mark.parametrize('code,what,everywhere', [
    ('torch.Generator().manual_seed(1)', 'torch.Generator() without', True),
    ('torch.zeros(3, dtype=torch.float64)', 'torch.zeros() without', False),
    ('torch.randint(0, 2, (3, ), generator=g)', 'torch.randint() without',
     False),
])
def test_estimator_factories_without_device_are_flagged(code, what,
                                                        everywhere):
    found = findings(code, 'sensitivity/hutchinson.py')
    assert len(found) == 1 and found[0][2].startswith(what)
    # generators are flagged everywhere, factories in the device folders
    assert bool(findings(code, 'report.py')) == everywhere

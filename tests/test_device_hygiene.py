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

A second check (:func:`kept_views`) flags a tensor kept beyond the call
that received it — appended to a list, stored in a dict or on an object —
as a view of that argument (``.detach()``, ``.cpu()``, ``.float()``,
``.reshape()``, a slice; on the CPU none of them copies) or, in a forward
hook, the argument itself. The forward goes on after a hook and rewrites
such tensors in place (``ReLU(inplace=True)``, a residual ``+=``): the
activation observer kept views, and its percentile ranges lost the small
DETR 15 mAP (issue 28). A kept tensor must be a copy (``.clone()``,
``.to(..., copy=True)``) or something computed from it.
"""
import ast
import os
import os.path as osp
from typing import List, Optional, Set, Tuple

import pytest

import mmdet_hawq

from .conftest import SCRIPT_DIRS

PACKAGE = osp.dirname(mmdet_hawq.__file__)
ROOT = osp.dirname(PACKAGE)
FACTORIES = {'zeros', 'ones', 'full', 'empty', 'arange', 'tensor', 'randint',
             'randn', 'rand', 'eye', 'linspace', 'as_tensor'}
#: Folders whose tensor factories must name a device.
DEVICE_FOLDERS = ('api', 'sensitivity', 'quant', 'deploy', 'models')
#: (file under mmdet_hawq/, source line stripped) → why it is host-side.
HOST_BY_DESIGN = {
    ('sensitivity/sampling.py',
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
    """Unlisted findings in the package and the scripts (tools/,
    benchmarks/, experiments/, release/) as 'file:line: what: code', and
    the listed lines that matched."""
    bad, matched = [], set()
    for top, prefix in ((PACKAGE, ''), *((osp.join(ROOT, d), d + '/')
                                         for d in SCRIPT_DIRS)):
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


#: Methods that return their input's storage (on the CPU at least).
VIEWS = {'detach', 'cpu', 'float', 'double', 'reshape', 'view', 'view_as',
         'flatten', 'contiguous', 'to', 'transpose', 'permute', 'squeeze',
         'unsqueeze', 'expand', 'expand_as', 'requires_grad_', 't', 'type',
         'narrow', 'select', 'unflatten', 'as_strided', 'type_as'}
#: Calls that keep what they are given.
KEEPS = {'append', 'extend', 'insert', 'setdefault'}
#: Parameter names of forward (pre-)hooks after the module.
HOOK_ARGS = {'args', 'input', 'inputs'}
#: (file, source line stripped) → why the kept view is safe.
KEPT_BY_DESIGN = {
    ('quant/activations.py', 'seen.append((site, x))'):
    'a capture for autograd: an in-place change after it makes backward '
    'fail loudly (version counter), it cannot go silently wrong',
    ('quant/activations.py', 'produced[id(out)] = (name, out)'):
    'kept for its identity (``is``), its values are never read',
    ('deploy/onnx_export.py', 'self._pending = (codes.to(torch.int8),'):
    "a packed checkpoint's codes, not an activation",
    ('deploy/onnx_export.py', 'scale.reshape(()) if axis is None else'):
    "a packed checkpoint's scale, not an activation",
}


def _root(node: ast.AST, params: Set[str], local: dict, depth: int = 0
          ) -> Tuple[Optional[str], bool]:
    """(parameter the value of ``node`` may share storage with, whether a
    view op is on the way), following local assignments; (None, False) for
    a new tensor (a copy, arithmetic, a reduction, a call)."""
    if depth > 20:
        return None, False
    if isinstance(node, ast.Name):
        if node.id in local:  # ``x = x.detach()``: the right x is earlier
            rest = {k: v for k, v in local.items() if k != node.id}
            return _root(local[node.id], params, rest, depth + 1)
        return (node.id, False) if node.id in params else (None, False)
    if isinstance(node, ast.Subscript):  # a slice is a view, an index
        root, view = _root(node.value, params, local, depth + 1)
        return root, view or (root is not None and _slices(node))
    if isinstance(node, ast.IfExp):
        for branch in (node.body, node.orelse):
            root, view = _root(branch, params, local, depth + 1)
            if root is not None:
                return root, view
        return None, False
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr in VIEWS and not any(
                k.arg == 'copy' for k in node.keywords):
        root, _ = _root(node.func.value, params, local, depth + 1)
        return root, root is not None
    return None, False


def _slices(node: ast.Subscript) -> bool:
    """Whether a subscript takes a slice (``x[::2]``, ``x[:, 0]``)."""
    return any(isinstance(n, ast.Slice) for n in ast.walk(node.slice))


def kept_views(source: str) -> List[Tuple[int, str]]:
    """(line, what) for every argument, or view of one, kept beyond the
    call of the function that received it (see the module docstring)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = [a.arg for a in fn.args.args]
        params = set(names) - {'self', 'cls'}
        hook = len(names) >= 2 and names[0] == 'module' and \
            names[1] in HOOK_ARGS
        local: dict = {}
        stored: List[ast.AST] = []
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        local[target.id] = node.value
                    elif isinstance(target, ast.Attribute) or (
                            isinstance(target, ast.Subscript)
                            and not _slices(target)):  # not a copy into
                        stored.append(node.value)
            elif isinstance(node, ast.Call) and isinstance(
                    node.func, ast.Attribute) and node.func.attr in KEEPS:
                stored.extend(node.args[-1:])
        for value in stored:
            parts = value.elts if isinstance(value, ast.Tuple) else [value]
            for part in parts:
                root, view = _root(part, params, local)
                if root is not None and (view or hook):
                    found.append((part.lineno,
                                  f'keeps {"a view of " if view else ""}'
                                  f'argument {root!r} beyond the call'))
    return found


def package_kept_views() -> Tuple[List[str], Set[Tuple[str, str]]]:
    """Unlisted kept views in the package as 'file:line: what: code', and
    the listed lines that matched."""
    bad, matched = [], set()
    for folder, _, files in sorted(os.walk(PACKAGE)):
        for name in sorted(f for f in files if f.endswith('.py')):
            path = osp.join(folder, name)
            rel = osp.relpath(path, PACKAGE).replace(osp.sep, '/')
            with open(path) as f:
                source = f.read()
            lines = source.splitlines()
            for line, what in kept_views(source):
                code = lines[line - 1].strip()
                if (rel, code) in KEPT_BY_DESIGN:
                    matched.add((rel, code))
                else:
                    bad.append(f'mmdet_hawq/{rel}:{line}: {what}: {code}')
    return bad, matched


def test_package_keeps_no_view_of_a_live_tensor():
    bad, matched = package_kept_views()
    assert not bad, 'kept views of live tensors:\n' + '\n'.join(bad)
    assert matched == set(KEPT_BY_DESIGN), \
        f'stale entries: {set(KEPT_BY_DESIGN) - matched}'


OLD_OBSERVER = '''
class _Observer:
    def add(self, x):
        flat = x.detach().reshape(-1).float()
        self.lo = min(self.lo, float(flat.min()))
        if self.kept < SAMPLE_PER_SITE:
            step = max(1, math.ceil(flat.numel() / SAMPLE_PER_BATCH))
            part = flat[::step].cpu()
            self.samples.append(part)
'''


def test_flags_the_observer_that_kept_views():
    """The check fails on the activation observer as it was (issue 28)."""
    assert kept_views(OLD_OBSERVER) == [
        (9, "keeps a view of argument 'x' beyond the call")]


@pytest.mark.parametrize('code,flagged', [
    ('def f(self, x):\n    self.keep = x.detach()', True),
    ('def f(x, out):\n    out.append(x[::2].cpu())', True),
    ('def hook(module, args, output):\n    caught[0] = output', True),
    ('def hook(module, args):\n    seen.append(args[0])', True),
    ('def f(self, x):\n    self.keep = x.detach().clone()', False),
    ("def f(x, out):\n    out.append(x[::2].to('cpu', copy=True))", False),
    ('def f(x, out):\n    out.append(float(x.max()))', False),
    ('def f(x, out):\n    out.append(x.detach() * 2)', False),
    ('def f(self, model):\n    self.model = model', False),
    ('def f(x, out):\n    out[:4] = x.reshape(-1)', False),
    ('def f(bits, fixed):\n    fixed[0] = bits[-1]', False),
])
def test_kept_views(code, flagged):
    assert bool(kept_views(code)) == flagged

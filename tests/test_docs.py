"""The docs stay true to the tree: every script or config a command in
README.md or docs/ names exists, and the module map of
docs/development.md names every module and script (and nothing else)."""
import glob
import os.path as osp
import re

from .conftest import ROOT, SCRIPT_DIRS

DOCS = [osp.join(ROOT, 'README.md')] + sorted(
    glob.glob(osp.join(ROOT, 'docs', '*.md')))
#: A script or config path as the docs write it (no wildcards or braces).
PATH = re.compile(r'(?<![\w/.-])((?:%s|configs|mmdet_hawq|tests)/'
                  r'[\w/.-]*\w\.(?:py|sh))(?![\w{*])'
                  % '|'.join(SCRIPT_DIRS))
#: mmdet's own scripts, which the docs name beside ours.
MMDET_SCRIPTS = ('tools/test.py', 'tools/train.py')
#: Lines run in a worktree of an earlier release (its own layout).
OTHER_TREE = '/tmp/hawq_ref'
#: ``python -m package.module``
MODULE = re.compile(r'python3? -m (mmdet_hawq(?:\.\w+)+)')


def named_paths(text: str):
    """The script and config paths of ``text`` that must exist here."""
    for line in text.splitlines():
        if OTHER_TREE in line:
            continue
        for match in PATH.finditer(line):
            if match.group(1) not in MMDET_SCRIPTS:
                yield match.group(1)


def test_every_command_names_an_existing_file():
    missing = []
    for doc in DOCS:
        with open(doc, encoding='utf-8') as f:
            text = f.read()
        rel = osp.relpath(doc, ROOT)
        for path in set(named_paths(text)):
            if not osp.isfile(osp.join(ROOT, path)):
                missing.append(f'{rel}: {path}')
        for module in set(MODULE.findall(text)):
            file = osp.join(ROOT, *module.split('.'))
            if not (osp.isfile(file + '.py') or
                    osp.isfile(osp.join(file, '__main__.py'))):
                missing.append(f'{rel}: python -m {module}')
    assert not missing, '\n'.join(sorted(missing))


def test_the_checker_finds_a_missing_script():
    text = ('python tools/ptq.py configs/detr/x.py\n'
            'see `benchmarks/nope.py` and experiments/table1.py, not '
            "configs/*/*_{a,b}_*bit.py or mmdet's tools/test.py\n"
            '(cd /tmp/hawq_ref && python tools/table1.py)')
    assert sorted(named_paths(text)) == [
        'benchmarks/nope.py', 'configs/detr/x.py', 'experiments/table1.py',
        'tools/ptq.py']


def module_map() -> str:
    """The code block under 'Where each step lives' in development.md."""
    with open(osp.join(ROOT, 'docs', 'development.md'),
              encoding='utf-8') as f:
        text = f.read()
    section = text.split('## Where each step lives', 1)[1]
    return section.split('```', 2)[1]


def test_the_module_map_names_every_module_and_script():
    block = module_map()
    package = osp.join(ROOT, 'mmdet_hawq')
    unnamed = []
    for path in sorted(glob.glob(osp.join(package, '**', '*.py'),
                                 recursive=True)):
        rel = osp.relpath(path, package)
        if osp.basename(rel) == '__init__.py':
            continue  # a package's face: its docstring says what it is for
        # a module by its path, or a folder above it by its name
        parts = rel.split('/')
        folders = ['/'.join(parts[:k]) + '/' for k in range(1, len(parts))]
        if rel not in block and not any(
                re.search(r'(?<![\w/])' + re.escape(f) + r'\s', block)
                for f in folders):
            unnamed.append(f'mmdet_hawq/{rel}')
    for folder in SCRIPT_DIRS:
        for path in sorted(glob.glob(osp.join(ROOT, folder, '*.*'))):
            if path.endswith('.md'):
                continue
            if not re.search(r'(?<![\w/])' + re.escape(osp.basename(path)),
                             block):
                unnamed.append(osp.relpath(path, ROOT))
    assert not unnamed, 'not in the module map of docs/development.md: ' + \
        ', '.join(unnamed)


def test_the_module_map_names_nothing_that_is_gone():
    block = module_map()
    gone = [name for name in re.findall(r'(?<![\w/.])([\w/]+\.(?:py|sh))',
                                        block)
            if not glob.glob(osp.join(ROOT, 'mmdet_hawq', name)) and
            not any(osp.isfile(osp.join(ROOT, d, name)) for d in SCRIPT_DIRS)]
    assert not gone, f'the module map names what does not exist: {gone}'


def test_each_script_folder_has_a_readme_line_per_script():
    missing = []
    for folder in SCRIPT_DIRS[1:]:
        with open(osp.join(ROOT, folder, 'README.md'), encoding='utf-8') as f:
            text = f.read()
        missing += [f'{folder}/{osp.basename(p)}' for p in
                    glob.glob(osp.join(ROOT, folder, '*.*'))
                    if not p.endswith('.md') and
                    f'`{osp.basename(p)}`' not in text]
    assert not missing, f'no README line for {missing}'


def usage_section(heading: str) -> str:
    with open(osp.join(ROOT, 'docs', 'usage.md'), encoding='utf-8') as f:
        text = f.read()
    body = text.split(f'\n{heading}\n', 1)[1]
    return re.split(r'\n##+ ', body, 1)[0]


def test_the_documented_settings_are_the_settings_fields():
    """docs/usage.md names every field of every settings class in its
    section, and the hook's arguments are QuantSettings' fields and the
    hook's own."""
    from dataclasses import fields

    from mmdet_hawq.api import (ActivationSettings, CalibrationSettings,
                                GptqSettings, QuantSettings,
                                SensitivitySettings)
    import inspect

    from mmdet_hawq.engine.hooks.quantization_hook import (
        OWN_ARGS, DistillSensitivityHook)
    sections = {
        '### Hook arguments': (QuantSettings, OWN_ARGS),
        '### Calibration settings': (CalibrationSettings, ()),
        '### Sensitivity settings': (SensitivitySettings, ()),
        '### GPTQ settings': (GptqSettings, ()),
        '### Activation settings': (ActivationSettings, ()),
    }
    missing = []
    for heading, (cls, own) in sections.items():
        text = usage_section(heading)
        names = [f.name for f in fields(cls) if f.init] + list(own)
        missing += [f'{heading}: {n}' for n in names
                    if not re.search(r'`' + n + r'\b', text)]
    assert not missing, missing
    # the hook takes its own arguments and the settings, nothing else
    params = inspect.signature(DistillSensitivityHook).parameters
    assert tuple(n for n, p in params.items()
                 if p.kind is not p.VAR_KEYWORD) == OWN_ARGS


def pins():
    """name -> version of every ``==`` pin in setup.py and
    requirements.txt (their one source each)."""
    found = {}
    for name in ('setup.py', 'requirements.txt'):
        with open(osp.join(ROOT, name)) as f:
            found.update(re.findall(r"([A-Za-z][\w-]*)==([\w.]+)", f.read()))
    return found


#: The venv of the GPU check's rehearsal: the device's Python and torch.
REHEARSAL = '/tmp/dev312'


def test_every_pinned_version_the_docs_name_is_the_pin():
    """``pkg==version`` in the README, docs/ and the GPU check is the
    version setup.py or requirements.txt pins (no second source)."""
    known = pins()
    assert {'mmdet', 'mmengine', 'onnx', 'onnxruntime', 'torch', 'mmcv',
            'openvino', 'nncf'} <= set(known)
    other = []
    for path in DOCS + [osp.join(ROOT, 'release', 'gpu_check.sh')]:
        with open(path, encoding='utf-8') as f:
            # the GPU check's rehearsal copies the device's own torch
            text = '\n'.join(ln for ln in f if REHEARSAL not in ln)
            for name, ver in re.findall(r"([A-Za-z][\w-]*)==([\w.]+)",
                                        text):
                if name in known and known[name] != ver:
                    other.append(f'{osp.relpath(path, ROOT)}: {name}=={ver}'
                                 f' (pinned {known[name]})')
    assert not other, other


def test_every_package_says_what_it_is_for():
    import ast
    bare = []
    for path in glob.glob(osp.join(ROOT, 'mmdet_hawq', '**', '__init__.py'),
                          recursive=True):
        with open(path) as f:
            if not ast.get_docstring(ast.parse(f.read())):
                bare.append(osp.relpath(path, ROOT))
    assert not bare, bare


def test_the_readme_layout_names_every_package_and_folder():
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        block = f.read().split('## Package layout', 1)[1].split('```')[1]
    packages = [osp.basename(osp.dirname(p)) for p in glob.glob(
        osp.join(ROOT, 'mmdet_hawq', '*', '__init__.py'))]
    named = re.findall(r'(?<![\w/])(\w+)/', block)
    assert sorted(set(packages) - set(named)) == []
    tops = [d for d in named if osp.isdir(osp.join(ROOT, d))]
    assert set(SCRIPT_DIRS) | {'configs', 'mmdet_hawq', 'tests'} <= \
        set(tops)
    gone = [d for d in named if not osp.isdir(osp.join(ROOT, d)) and
            not osp.isdir(osp.join(ROOT, 'mmdet_hawq', d)) and
            not osp.isdir(osp.join(ROOT, 'configs', d)) and
            d not in ('results', 'checkpoints')]
    assert not gone, gone

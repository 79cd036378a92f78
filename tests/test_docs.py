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

"""What the command-line tools check before any run: the config file (one
line naming a syntax error's file and line, also in a ``_base_`` file, or
the family folder a config of the old flat ``configs/`` layout moved to) and
the work dir (writable)."""
import ast
import glob
import os
import os.path as osp
from typing import Any, List, Optional, Sequence, Tuple

from ..errors import HawqUserError


def check_work_dir(path: str) -> str:
    """Create the work dir if needed and make sure files can be written.

    Args:
        path (str): The work dir.

    Returns:
        str: ``path``.

    Raises:
        HawqUserError: It cannot be created or written (read-only, or a
            path under a file).
    """
    try:
        os.makedirs(path, exist_ok=True)
        probe = osp.join(path, f'.hawq_write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as err:
        raise HawqUserError(
            f'work dir {path!r} cannot be written ({err.strerror or err}): '
            'pass a writable folder with --work-dir') from None
    return path


def config_syntax_error(path: str, depth: int = 0
                        ) -> Optional[Tuple[str, int, str]]:
    """The first syntax error of a Python config or of its ``_base_`` files.

    Args:
        path (str): The config file.
        depth (int): Recursion depth (bases of bases). Defaults to 0.

    Returns:
        tuple, optional: (file, line, message), or None when every file
        parses.
    """
    try:
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as err:
        return path, err.lineno or 0, err.msg
    except OSError:
        return None
    if depth > 8:
        return None
    for base in _base_files(tree):
        found = config_syntax_error(
            osp.join(osp.dirname(path), base), depth + 1)
        if found:
            return found
    return None


def _base_files(tree: ast.Module) -> List[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_'
                for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            bases = [value] if isinstance(value, str) else list(value)
            return [b for b in bases if isinstance(b, str)
                    and b.endswith('.py') and '::' not in b]
    return []


#: The project's configs, one folder per detector family (mmdet's layout)
#: beside ``_base_``.
CONFIGS_DIR = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs')


def moved_config(path: str, configs_dir: str = CONFIGS_DIR) -> Optional[str]:
    """Where a config of the old flat ``configs/`` folder lives now.

    The configs moved into per-family folders (``configs/detr/``,
    ``configs/dino/``, ...); an old path such as
    ``configs/detr_r50_outquant_5bit.py`` names a file that no longer
    exists.

    Args:
        path (str): A config path.
        configs_dir (str): The project's configs folder. Defaults to the
            ``configs/`` of this checkout.

    Returns:
        str, optional: The path of the config of the same file name in a
        family folder of ``configs_dir`` (written like ``path``: under the
        folder ``path`` names when that is ``configs_dir``, else relative to
        the current directory when below it), or None when ``path`` exists,
        is not a ``.py`` file or no family folder has that name.
    """
    name = osp.basename(path)
    if osp.exists(path) or not name.endswith('.py') or \
            not osp.isdir(configs_dir):
        return None
    hits = [hit for hit in sorted(glob.glob(
                osp.join(glob.escape(configs_dir), '*', glob.escape(name))))
            if osp.basename(osp.dirname(hit)) != '_base_']
    if not hits:
        return None
    family = osp.basename(osp.dirname(hits[0]))
    folder = osp.dirname(path)
    if osp.isdir(folder or '.') and \
            osp.samefile(folder or '.', configs_dir):
        return osp.join(folder, family, name)
    rel = osp.relpath(hits[0])
    return hits[0] if rel.startswith('..') else rel


def read_config(path: str):
    """``mmengine.Config.fromfile`` with user errors as one line.

    Args:
        path (str): The config file.

    Returns:
        mmengine.config.Config: The config.

    Raises:
        HawqUserError: The file is missing (with the family folder it
            moved to, for a path of the old flat ``configs/`` layout) or has
            a syntax error (the file and line named, also when it is in a
            ``_base_`` file).
    """
    from mmengine.config import Config
    if not osp.isfile(path):
        moved = moved_config(path)
        if moved:
            raise HawqUserError(
                f'config {path} does not exist: it moved to {moved}')
        raise HawqUserError(
            f'config file {path!r} does not exist: pass a config path '
            'such as configs/detr/detr_tiny_shapes_uniform_8bit.py')
    try:
        return Config.fromfile(path)
    except SyntaxError as err:
        where = config_syntax_error(path)
        if where is None:
            where = path, err.lineno or 0, err.msg
        raise HawqUserError(
            f'config file {where[0]!r} has a syntax error at line '
            f'{where[1]} ({where[2]}): fix the config') from None


def check_positive(args: Any, names: Sequence[str]) -> None:
    """One line for the first of ``names`` (options) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HawqUserError(f'--{name.replace("_", "-")} takes a '
                                f'positive integer, not {value}')

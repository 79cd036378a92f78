"""What the command-line tools check before any run: the config file (one
line naming a syntax error's file and line, also in a ``_base_`` file) and
the work dir (writable)."""
import ast
import os
import os.path as osp
from typing import List, Optional, Tuple

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


def read_config(path: str):
    """``mmengine.Config.fromfile`` with user errors as one line.

    Args:
        path (str): The config file.

    Returns:
        mmengine.config.Config: The config.

    Raises:
        HawqUserError: The file is missing or has a syntax error (the file
            and line named, also when it is in a ``_base_`` file).
    """
    from mmengine.config import Config
    if not osp.isfile(path):
        raise HawqUserError(
            f'config file {path!r} does not exist: pass a config path '
            'such as configs/detr_tiny_shapes_uniform_8bit.py')
    try:
        return Config.fromfile(path)
    except SyntaxError as err:
        where = config_syntax_error(path)
        if where is None:
            where = path, err.lineno or 0, err.msg
        raise HawqUserError(
            f'config file {where[0]!r} has a syntax error at line '
            f'{where[1]} ({where[2]}): fix the config') from None

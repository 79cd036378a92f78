"""The steps every command-line script shares, each with its one-line
errors: read the config with ``--cfg-options`` (a syntax error's file and
line named, also in a ``_base_`` file, or the family folder a config of the
old flat ``configs/`` layout moved to), check the checkpoint and the work
dir, build the detector (:func:`~.detector.build_detector`) and write the
results JSON. The scripts of tools/, benchmarks/ and experiments/ call
these and nothing of each other."""
import ast
import glob
import json
import os
import os.path as osp
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from ..errors import HawqUserError
from .checkpoint import check_checkpoint
from .detector import build_detector

__all__ = ['check_checkpoint', 'check_positive', 'check_work_dir',
           'load_detector', 'read_config', 'write_json']


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


def read_config(path: str, cfg_options: Optional[Mapping] = None):
    """``mmengine.Config.fromfile`` with user errors as one line, and the
    command line's ``--cfg-options`` merged in.

    Args:
        path (str): The config file.
        cfg_options (Mapping, optional): ``key.path -> value`` overrides
            (mmengine's ``DictAction``). Defaults to None.

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
        cfg = Config.fromfile(path)
    except SyntaxError as err:
        where = config_syntax_error(path)
        if where is None:
            where = path, err.lineno or 0, err.msg
        raise HawqUserError(
            f'config file {where[0]!r} has a syntax error at line '
            f'{where[1]} ({where[2]}): fix the config') from None
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_detector(cfg: Any, checkpoint: str,
                  option: Optional[str] = None) -> Any:
    """The config's detector with ``checkpoint`` loaded strictly, in eval
    mode (:func:`~.detector.build_detector`), after mmdet's modules are
    registered and the file checked (:func:`check_checkpoint`).

    Args:
        cfg (mmengine.Config): The config.
        checkpoint (str): A checkpoint file or URL.
        option (str, optional): The option that took it, for the message.

    Returns:
        nn.Module: The detector.
    """
    from mmdet.utils import register_all_modules
    register_all_modules()
    return build_detector(cfg, check_checkpoint(checkpoint, option))


def write_json(path: str, record: Any) -> str:
    """Write a script's results as indented JSON (numpy and torch scalars
    as floats), creating the folder; atomically (a file that is there is
    whole, for the scripts that resume from theirs).

    Args:
        path (str): The JSON file.
        record: Its content.

    Returns:
        str: ``path``.
    """
    folder = osp.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(path + '.tmp', path)
    return path


def check_positive(args: Any, names: Sequence[str]) -> None:
    """One line for the first of ``names`` (options) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HawqUserError(f'--{name.replace("_", "-")} takes a '
                                f'positive integer, not {value}')

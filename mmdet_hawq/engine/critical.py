"""The ``critical_classes`` sensitivity setting: checked names → columns.

The user names classes of the calibration dataset (its metainfo
``classes``); the objective (:mod:`mmdet_hawq.sensitivity.critical`) gets
their column indices. The names are checked in three steps, each as early as
it can be: their form with the other settings (no data), against the
classes the dataset config declares (the hook's ``check_model``, before any
data), and against the built calibration dataset's metainfo (before any
trace sampling).
"""
import difflib
from typing import List, Optional, Sequence

from mmdet.registry import DATASETS
from ..errors import HawqUserError, short_list

WHAT = 'sensitivity critical_classes'


def check_critical_form(value, metric: str) -> Optional[List[str]]:
    """The setting as a list of names, or None; checked without data.

    Args:
        value: The user's ``critical_classes``: None, a list (or tuple) of
            class names, or one name.
        metric (str): The sensitivity metric.

    Returns:
        list[str] or None: The names, in the user's order.

    Raises:
        HawqUserError: One line: a metric without a class term, an empty
            list, an entry that is not a string, or a duplicate.
    """
    if value is None:
        return None
    if metric == 'losssen':
        raise HawqUserError(
            f"{WHAT}: metric 'losssen' (the detector's own loss) has no "
            'distillation class term to restrict: use outquant or outfloat')
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise HawqUserError(
            f'{WHAT} is {value!r}: give a list of class names, e.g. '
            "['cross']")
    if not names:
        raise HawqUserError(
            f'{WHAT} is empty: give at least one class name, or leave it '
            'None for every class')
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise HawqUserError(
            f'{WHAT}: {bad[0]!r} is not a class name (a string): give the '
            "names, e.g. ['cross'], not indices")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise HawqUserError(
            f'{WHAT} lists {short_list([repr(d) for d in dups])} more than '
            'once: give each class once')
    return list(names)


def critical_indices(names: Sequence[str],
                     classes: Sequence[str]) -> List[int]:
    """Column indices of ``names`` among the dataset's ``classes``, sorted.

    Args:
        names (Sequence[str]): Checked names (:func:`check_critical_form`).
        classes (Sequence[str]): The dataset's metainfo ``classes``.

    Returns:
        list[int]: Sorted indices (the column order of the class head).

    Raises:
        HawqUserError: A name is not a class of the dataset; the line lists
            the classes and the closest name.
    """
    classes = list(classes)
    for name in names:
        if name not in classes:
            close = difflib.get_close_matches(name, classes, n=1)
            hint = f'; did you mean {close[0]!r}?' if close else ''
            raise HawqUserError(
                f'{WHAT}: {name!r} is not a class of the dataset: the '
                f'classes are {short_list(classes, 30)}{hint}')
    return sorted(classes.index(n) for n in names)


def declared_classes(dataset_cfg) -> Optional[List[str]]:
    """The classes a dataset config declares, without loading any data.

    Args:
        dataset_cfg (dict): A dataset config (``type``, optional
            ``metainfo``).

    Returns:
        list[str] or None: ``metainfo.classes`` of the config, else the
        dataset class's ``METAINFO['classes']``; None when neither says
        (e.g. a dataset wrapper), and the built dataset is checked instead.
    """
    meta = dataset_cfg.get('metainfo') or {}
    if meta.get('classes'):
        return list(meta['classes'])
    kind = dataset_cfg.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    classes = getattr(cls, 'METAINFO', {}).get('classes')
    return list(classes) if classes else None

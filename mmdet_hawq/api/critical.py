"""The ``critical_classes`` sensitivity setting: its form, checked without
data, and its class names as columns of the class head."""
import difflib
from typing import Any, List, Optional, Sequence

from ..errors import HawqUserError, short_list

CRITICAL = 'sensitivity critical_classes'


def check_critical_form(value: Any, metric: str) -> Optional[List[str]]:
    """The ``critical_classes`` setting as a list of names, or None;
    checked without data.

    Raises:
        HawqUserError: One line: a metric without a class term, an empty
            list, an entry that is not a string, or a duplicate.
    """
    if value is None:
        return None
    if metric == 'losssen':
        raise HawqUserError(
            f"{CRITICAL}: metric 'losssen' (the detector's own loss) has no "
            'distillation class term to restrict: use outquant or outfloat')
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise HawqUserError(
            f'{CRITICAL} is {value!r}: give a list of class names, e.g. '
            "['cross']")
    if not names:
        raise HawqUserError(
            f'{CRITICAL} is empty: give at least one class name, or leave '
            'it None for every class')
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise HawqUserError(
            f'{CRITICAL}: {bad[0]!r} is not a class name (a string): give '
            "the names, e.g. ['cross'], not indices")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise HawqUserError(
            f'{CRITICAL} lists {short_list([repr(d) for d in dups])} more '
            'than once: give each class once')
    return list(names)


def critical_indices(names: Sequence[str],
                     classes: Sequence[str]) -> List[int]:
    """Column indices of ``names`` among the dataset's ``classes``, sorted.

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
                f'{CRITICAL}: {name!r} is not a class of the dataset: the '
                f'classes are {short_list(classes, 30)}{hint}')
    return sorted(classes.index(n) for n in names)

"""The error type for bad user input.

Tools catch :class:`HawqUserError` and print its message as one line; it
always names the offending thing and what to change.
"""
import sys
from typing import Callable, Sequence


class HawqUserError(RuntimeError):
    """Bad input from the user: a path, a config value, a plan, a model."""


def run_cli(main: Callable[[], int]) -> None:
    """Run a tool's ``main``; a :class:`HawqUserError` becomes one line on
    stderr and exit status 2."""
    try:
        sys.exit(main())
    except HawqUserError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)


def short_list(items: Sequence, limit: int = 5) -> str:
    """``a, b, c, ... and N more``: a long list cut for one error line.

    Args:
        items (Sequence): The items (shown with ``str``).
        limit (int): How many are shown. Defaults to 5.

    Returns:
        str: The first ``limit`` items, comma separated, and how many more.
    """
    shown = ', '.join(str(i) for i in items[:limit])
    more = len(items) - limit
    return shown + (f', ... and {more} more' if more > 0 else '')

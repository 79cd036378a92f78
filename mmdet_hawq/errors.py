"""The error type for bad user input.

Tools catch :class:`HawqUserError` and print its message as one line; it
always names the offending thing and what to change.
"""
import os
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
        if _in_process_group():
            # a failed collective leaves backend threads behind that abort
            # ("terminate called ...") when the interpreter tears down
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(2)
        sys.exit(2)


def _in_process_group() -> bool:
    dist = sys.modules.get('torch.distributed')
    return bool(dist is not None and dist.is_available()
                and dist.is_initialized())


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

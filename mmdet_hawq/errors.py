"""The error type for bad user input.

Tools catch :class:`HawqUserError` and print its message as one line; it
always names the offending thing and what to change.
"""
import sys
from typing import Callable


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

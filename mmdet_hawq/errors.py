"""The error type for bad user input.

Tools catch :class:`HawqUserError` and print its message as one line; it
always names the offending thing and what to change.
"""


class HawqUserError(RuntimeError):
    """Bad input from the user: a path, a config value, a plan, a model."""

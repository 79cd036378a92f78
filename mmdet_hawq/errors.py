"""The error type for bad user input, and how tools end.

Tools catch :class:`HawqUserError` and print its message as one line; it
always names the offending thing and what to change. Ctrl-C and SIGTERM end
a tool with one line too (:func:`run_cli`), saying what is saved.

Run through another program (mmdet's own ``tools/test.py`` with the plugin
loaded by ``custom_imports``), an uncaught :class:`HawqUserError` ends the
program with the same line and exit status 2 (:func:`install_excepthook`,
installed when the package is imported); so does Ctrl-C or SIGTERM once a
step that saves work has said so (:func:`set_interrupt_note`, with
:func:`terminate_as_interrupt` around that step), with exit status 130 or
143. ``MMDET_HAWQ_TRACEBACK=1`` shows the traceback instead.

Running out of memory (on the GPU or the host) inside the hook is the
size of the job, not a bug: :func:`report_internal_errors` turns it into
one :class:`HawqUserError` line that says what to lower
(:func:`out_of_memory`).

Any other exception inside the hook is a bug, not the user's input:
:func:`report_internal_errors` turns it into a :class:`HawqInternalError`
that carries where it was raised and its traceback. mmengine's Runner hides
the traceback of a ``TypeError`` from a hook (``call_hook`` re-raises it
``from None`` as ``'{e} in {hook}'``); a :class:`HawqInternalError` is not a
``TypeError``, and both :func:`run_cli` and the excepthook print its origin
(``internal error in mmdet-hawq at FILE:LINE in FUNC: ...``), then the
original traceback, and end with exit status 1.
"""
import functools
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from types import TracebackType
from typing import (Any, Callable, Iterator, Optional, Sequence, Tuple, Type,
                    TypeVar)

import torch

#: Exit status after SIGINT (Ctrl-C) and SIGTERM, as a shell reports them.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

#: Exit status of a run stopped by a :class:`HawqUserError`.
EXIT_USER_ERROR = 2
#: Exit status of a run stopped by a :class:`HawqInternalError` (as
#: Python's own for an uncaught exception).
EXIT_INTERNAL_ERROR = 1
#: Set (to anything but ``''`` or ``0``) to see the traceback of a
#: :class:`HawqUserError` that reaches ``sys.excepthook`` (of a
#: :class:`HawqInternalError`: Python's report of its whole chain).
TRACEBACK_ENV = 'MMDET_HAWQ_TRACEBACK'

#: Says what an interrupted run has saved (set by the step that saves).
_interrupt_note: Optional[Callable[[], str]] = None


class HawqUserError(RuntimeError):
    """Bad input from the user: a path, a config value, a plan, a model."""


class HawqInternalError(RuntimeError):
    """An unexpected exception inside the plugin, with where it happened.

    Its message names the origin, ``internal error in mmdet-hawq at
    FILE:LINE in FUNC: TypeError: ...``, so that it survives any wrapper
    that keeps ``str(error)``; :attr:`details` is the original's traceback.

    Args:
        message (str): The one-line summary with the origin.
        details (str): The original exception's formatted traceback, its
            chain (``__cause__``/``__context__``) included.
    """

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details

    @classmethod
    def from_exception(cls, err: BaseException,
                       tb: Optional[TracebackType] = None
                       ) -> 'HawqInternalError':
        """The internal error of ``err``, located at its innermost frame.

        Args:
            err (BaseException): The unexpected exception.
            tb (TracebackType, optional): The part of ``err``'s traceback
                to show (e.g. without the frame that caught it). Defaults
                to None: all of it.

        Returns:
            HawqInternalError: The error to raise (``from err``).
        """
        tb = tb or err.__traceback__
        frames = traceback.extract_tb(tb)
        where = (f'{frames[-1].filename}:{frames[-1].lineno} in '
                 f'{frames[-1].name}') if frames else 'an unknown place'
        return cls(
            f'internal error in mmdet-hawq at {where}: '
            f'{type(err).__name__}: {err}',
            ''.join(traceback.format_exception(type(err), err, tb)))

    def report(self) -> str:
        """What a tool prints: the summary line, then the traceback."""
        return f'{self}\n{self.details}'.rstrip('\n')


_Fn = TypeVar('_Fn', bound=Callable[..., Any])


def out_of_memory(err: BaseException) -> Optional[HawqUserError]:
    """The one-line error of ``err`` if it is running out of memory (a
    ``torch.OutOfMemoryError`` on an accelerator, or the host allocator's
    failure), else None."""
    text = str(err).strip()
    if not (isinstance(err, torch.OutOfMemoryError) or (
            isinstance(err, RuntimeError)
            and "can't allocate memory" in text)):
        return None
    first = (text.splitlines() or [type(err).__name__])[0][:160]
    return HawqUserError(
        f'out of memory ({first}): lower the calibration batch size '
        '(sensitivity batch_size, default 4); Hutchinson\'s double backward '
        "takes several times the memory of estimator='gauss_newton' (the "
        'Out Sen default), and GPTQ holds fewer Hessians at once with '
        'gptq=dict(sequential=True); the sensitivity samples saved so far '
        'are kept, and the same command resumes from them')


def report_internal_errors(fn: _Fn) -> _Fn:
    """Make an unexpected exception in ``fn`` a :class:`HawqInternalError`.

    For the hook's entry points (``before_run``, ``before_test``, ...):
    :class:`HawqUserError`, :class:`HawqInternalError` and what is not an
    ``Exception`` (Ctrl-C, SIGTERM, ``sys.exit``) pass unchanged; running
    out of memory becomes a :class:`HawqUserError` (:func:`out_of_memory`).

    Args:
        fn (Callable): The entry point.

    Returns:
        Callable: ``fn``, wrapped.
    """
    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (HawqUserError, HawqInternalError):
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with its origin
            user = out_of_memory(err)
            if user is not None:
                raise user from None
            # the traceback from ``fn`` on: this frame says nothing
            raise HawqInternalError.from_exception(
                err, err.__traceback__.tb_next) from err

    return entry  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so ``finally`` blocks run."""


def set_interrupt_note(note: Optional[Callable[[], str]]) -> None:
    """Register what an interrupt message says about saved work.

    Args:
        note (Callable[[], str], optional): Called on Ctrl-C/SIGTERM; returns
            e.g. ``'7 sensitivity samples are saved in DIR; rerun the same
            command to resume from them'``. None clears it.
    """
    global _interrupt_note
    _interrupt_note = note


def interrupt_message(name: str) -> str:
    """The one line printed when a tool is stopped by signal ``name``."""
    note = None
    if _interrupt_note is not None:
        try:
            note = _interrupt_note()
        except Exception:  # noqa: BLE001 - the message must still come out
            note = None
    return f'interrupted by {name}: ' + (
        note or 'nothing was saved yet; rerun the same command to start '
        'again')


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


def _single_process() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1') or 1) <= 1


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` (like Ctrl-C),
    so that a step that saves work ends with one line saying so; outside,
    SIGTERM is as before.

    Only where SIGTERM still has its default action, in the main thread of
    a single process (:func:`run_cli` sets it up for the project's own
    tools; under ``torchrun`` the default action is kept): for programs
    such as mmdet's own ``tools/test.py``.
    """
    installed = False
    if _single_process() and \
            threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
        installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(main: Callable[[], int]) -> None:
    """Run a tool's ``main``; a :class:`HawqUserError` becomes one line on
    stderr and exit status 2, Ctrl-C (SIGINT) or SIGTERM one line and exit
    status 130 or 143 (SIGTERM only in a single process: ``torchrun``'s
    workers keep its default action), a :class:`HawqInternalError` its
    origin and traceback and exit status 1.

    Args:
        main (Callable[[], int]): The tool's main function; returns the exit
            status.
    """
    if _single_process():
        # under torchrun, SIGTERM stops the ranks left after one failed: a
        # rank blocked in a collective must die at once, as by default
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:
            pass  # not the main thread: SIGTERM keeps its default action
    try:
        sys.exit(main())
    except HawqUserError as err:
        _exit(f'error: {err}', EXIT_USER_ERROR)
    except HawqInternalError as err:
        _exit(err.report(), EXIT_INTERNAL_ERROR)
    except KeyboardInterrupt as err:
        _exit(*_interrupt_exit(err))


def _interrupt_exit(err: BaseException) -> Tuple[str, int]:
    """The line and exit status of a Ctrl-C (or :class:`Terminated`)."""
    terminated = isinstance(err, Terminated)
    return ('error: ' + interrupt_message(
        'SIGTERM' if terminated else 'Ctrl-C (SIGINT)'),
        EXIT_SIGTERM if terminated else EXIT_SIGINT)


def install_excepthook() -> None:
    """Chain a ``sys.excepthook`` that ends a program on an uncaught
    :class:`HawqUserError` with one line and exit status 2, on a
    :class:`HawqInternalError` with its origin and the original traceback
    and exit status 1, and on Ctrl-C or :class:`Terminated` with one line
    saying what is saved and exit status 130 or 143, once a step has
    registered what it saves (:func:`set_interrupt_note`).

    For programs that do not use :func:`run_cli`, such as mmdet's own
    ``tools/test.py`` with the plugin loaded by ``custom_imports``: a
    :class:`HawqUserError` raised in the hook would otherwise end in a long
    traceback. Every other exception goes to the previous hook unchanged;
    so does a Ctrl-C before any step registered a note, and everything
    when ``MMDET_HAWQ_TRACEBACK`` is set.
    An interactive session prints the line and goes on. Installing twice
    (a reloaded package) chains one hook only.
    """
    if not getattr(sys.excepthook, '_hawq_previous', None):
        previous = sys.excepthook

        def hook(exc_type: Type[BaseException], exc: BaseException,
                 tb: Optional[TracebackType]) -> None:
            _plugin_error_hook(previous, exc_type, exc, tb)

        hook._hawq_previous = previous  # type: ignore[attr-defined]
        sys.excepthook = hook


def _plugin_error_hook(previous: Callable, exc_type: Type[BaseException],
                       exc: BaseException,
                       tb: Optional[TracebackType]) -> None:
    interrupt = issubclass(exc_type, KeyboardInterrupt) and \
        _interrupt_note is not None
    if not (issubclass(exc_type, (HawqUserError, HawqInternalError))
            or interrupt) or \
            os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
        previous(exc_type, exc, tb)
        return
    if interrupt:
        line, status = _interrupt_exit(exc)
    elif isinstance(exc, HawqInternalError):
        line, status = exc.report(), EXIT_INTERNAL_ERROR
    else:
        line, status = f'error: {exc}', EXIT_USER_ERROR
    if hasattr(sys, 'ps1') or sys.flags.interactive:
        print(line, file=sys.stderr)  # a REPL goes on
        return
    # SystemExit raised by sys.excepthook sets the exit status
    _exit(line, status)


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr)
    if _in_process_group():
        # a failed collective leaves backend threads behind that abort
        # ("terminate called ...") when the interpreter tears down
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


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

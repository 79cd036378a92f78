"""errors.py: a user error is one line; an unexpected one says where it
happened; an interrupt says what is saved."""
import signal

import pytest
import torch

from mmdet_hawq import errors
from mmdet_hawq.errors import (HawqInternalError, HawqUserError,
                               interrupt_message, out_of_memory,
                               report_internal_errors, run_cli,
                               set_interrupt_note, short_list)


def _fails_deep():
    return {}['missing']


@report_internal_errors
def entry(kind: str):
    if kind == 'user':
        raise HawqUserError('bad value: give 4')
    if kind == 'oom':
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                           'you tried to allocate 1 bytes')
    if kind == 'interrupt':
        raise KeyboardInterrupt
    return _fails_deep()


def test_an_unexpected_error_names_its_origin():
    with pytest.raises(HawqInternalError) as err:
        entry('bug')
    line = str(err.value)
    assert line.startswith('internal error in mmdet-hawq at ')
    assert 'test_errors.py:' in line and 'in _fails_deep: KeyError' in line
    assert isinstance(err.value.__cause__, KeyError)
    report = err.value.report()
    assert report.splitlines()[0] == line
    assert 'Traceback' in report and 'in _fails_deep' in report


def test_user_errors_and_interrupts_pass_and_oom_is_one_line():
    with pytest.raises(HawqUserError, match='^bad value: give 4$'):
        entry('user')
    with pytest.raises(KeyboardInterrupt):
        entry('interrupt')
    with pytest.raises(HawqUserError, match='^out of memory .*lower the '
                       'calibration batch size'):
        entry('oom')
    assert out_of_memory(ValueError('x')) is None
    assert out_of_memory(torch.OutOfMemoryError('CUDA out of memory')) \
        is not None


def test_interrupt_message_says_what_is_saved():
    try:
        set_interrupt_note(lambda: '3 samples are saved in /c')
        assert interrupt_message('SIGTERM') == \
            'interrupted by SIGTERM: 3 samples are saved in /c'
        set_interrupt_note(lambda: 1 / 0)  # a broken note: still one line
        assert interrupt_message('Ctrl-C (SIGINT)').endswith(
            'nothing was saved yet; rerun the same command to start again')
    finally:
        set_interrupt_note(None)


@pytest.fixture
def keep_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize('raised, status, line', [
    (HawqUserError('config x.py does not exist: pass a path'),
     errors.EXIT_USER_ERROR, 'error: config x.py does not exist: pass a path'),
    (KeyboardInterrupt(), errors.EXIT_SIGINT,
     'error: interrupted by Ctrl-C (SIGINT): nothing was saved yet; rerun '
     'the same command to start again'),
    (errors.Terminated(), errors.EXIT_SIGTERM,
     'error: interrupted by SIGTERM: nothing was saved yet; rerun the same '
     'command to start again'),
])
def test_run_cli_ends_with_one_line_and_its_status(raised, status, line,
                                                   capsys, keep_sigterm):
    def main():
        raise raised

    with pytest.raises(SystemExit) as done:
        run_cli(main)
    assert done.value.code == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_run_cli_returns_mains_status(capsys, keep_sigterm):
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: 0)
    assert done.value.code == 0 and capsys.readouterr().err == ''


def test_short_list():
    assert short_list(['a', 'b']) == 'a, b'
    assert short_list(list(range(8)), 3) == '0, 1, 2, ... and 5 more'

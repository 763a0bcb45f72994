import os
import signal
import threading

import pytest

from jaxcam.checkpoint import interrupts_deferred


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test: a process started in the background by a
    non-interactive shell (as CI may start the suite) inherits SIGINT ignored instead."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_ctrl_c_inside_the_block_takes_effect_when_it_ends(python_sigint_handler):
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled between bytecodes
            finished.append("checkpoint")
            finished.append("history")
        finished.append("after the block")  # not reached: the interrupt takes effect first
    assert finished == ["checkpoint", "history"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_without_a_ctrl_c_nothing_changes_and_errors_pass_through(python_sigint_handler):
    before = signal.getsignal(signal.SIGINT)
    with interrupts_deferred():
        pass
    with pytest.raises(ValueError, match="inside"):
        with interrupts_deferred():
            raise ValueError("inside")
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored():
    # Under nohup or a launcher that ignores SIGINT, the block must not raise one of its own.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_the_block_runs_as_it_is():
    # signal.signal raises ValueError outside the main thread; training from a thread must still save.
    ran, errors = [], []

    def body():
        try:
            with interrupts_deferred():
                ran.append(True)
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert ran == [True] and errors == []

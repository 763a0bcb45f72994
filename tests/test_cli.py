import gc
import signal
import sys
import time

import jax
import pytest

from jaxcam import cli


@pytest.fixture
def cache_setting():
    """Run with no compilation cache folder configured; restore the suite's own afterwards."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", saved)


def test_compilation_cache_defaults_to_the_user_cache_folder(cache_setting, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "jaxcam" / "jax"
    assert cli.use_compilation_cache() == str(folder)
    assert folder.is_dir() and jax.config.jax_compilation_cache_dir == str(folder)


def test_a_configured_compilation_cache_folder_stands(cache_setting, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert cli.use_compilation_cache() == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", "")  # what JAX_COMPILATION_CACHE_DIR= gives: off
    assert cli.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == "" and not (tmp_path / "jaxcam").exists()


def test_an_unwritable_cache_home_leaves_the_cache_off(cache_setting, monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert cli.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def run_python_for(seconds: float) -> None:
    """Run Python bytecode for `seconds`, where a stop raised again would land (not a sleep in C)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def test_the_advice_after_ctrl_c_fits_how_far_train_py_got(tmp_path):
    # Stopped while the data loaded or the LR range test ran, no run can be resumed: it had said
    # "--resume continues from the last epoch that ended" all the same.
    assert cli.after_interrupt(None, None) == "interrupted before training began."
    run_dir = tmp_path / "my runs" / "resnet18_20261130_101500"
    run_dir.mkdir(parents=True)
    (run_dir / "lr_finder.json").write_text("{}")
    assert cli.after_interrupt(run_dir, 2) == "interrupted before training began."
    (run_dir / "config.json").write_text("{}")
    resume_advice = (f"interrupted; python train.py --resume '{run_dir}' continues from the last epoch that "
                     "ended.")
    assert cli.after_interrupt(run_dir, 2) == resume_advice
    # Stopped after the last epoch was saved, the run is complete: --resume had said "nothing to resume".
    (run_dir / "checkpoints" / "latest" / "1").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest" / "2.orbax-checkpoint-tmp-1764500000").mkdir()  # a save not finished
    assert cli.after_interrupt(run_dir, 2) == resume_advice
    (run_dir / "checkpoints" / "latest" / "2").mkdir()
    assert cli.after_interrupt(run_dir, 2) == ("interrupted after the last epoch was saved: the run is complete, and "
                                               "explain.py reports on it.")


def test_an_interrupt_dropped_in_a_gc_callback_is_raised_again(capsys):
    # JAX runs a callback at every garbage collection; a KeyboardInterrupt raised inside one is
    # printed as "Exception ignored in: <function _xla_gc_callback ...>" and dropped, and explain.py
    # then ran on to the end after a SIGTERM.
    def interrupted_during_collection(phase, info):
        raise KeyboardInterrupt

    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    reached = []
    gc.callbacks.append(interrupted_during_collection)
    try:
        with pytest.raises(KeyboardInterrupt):
            with cli.stop_signals_as_keyboard_interrupt():
                gc.collect()
                gc.callbacks.remove(interrupted_during_collection)
                reached.append("after the collection")
                run_python_for(10)  # the interrupt is raised again between bytecodes
                reached.append("ran on")
    finally:
        if interrupted_during_collection in gc.callbacks:
            gc.callbacks.remove(interrupted_during_collection)
    assert reached == ["after the collection"]
    assert capsys.readouterr().err == ""  # nothing of the dropped one is printed
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == (handler, hook)  # restored


def test_a_stop_that_c_code_swallows_is_raised_again():
    # C code can run a stop's handler and then clear the error it raised: JAX's MLIR bindings,
    # imported at the first compilation, did so, and train.py stopped at that moment ran on to
    # the end (2 of 100 tries of the LR range test's SIGTERM test, and once in CI).
    def clears_the_error():  # what such C code does
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pass

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with cli.stop_signals_as_keyboard_interrupt():
            clears_the_error()
            reached.append("after the stop")
            run_python_for(10)
            reached.append("ran on")
    assert reached == ["after the stop"]


def test_a_stop_is_raised_once_while_it_is_handled_and_not_after_it_is_reported(capsys):
    # Raised again during the cleanup it started (a checkpoint being written), or while its
    # sentence is printed, a stop would break both.
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with cli.stop_signals_as_keyboard_interrupt():
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                run_python_for(1)
                reached.append("cleaned up")
    assert reached == ["cleaned up"]
    with cli.stop_signals_as_keyboard_interrupt():
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt as e:
            assert cli._ended_by(e, "interrupted.") == 1
        signal.raise_signal(signal.SIGTERM)  # a second Ctrl-C while the process ends
        run_python_for(1)
        reached.append("ended as reported")
    assert reached == ["cleaned up", "ended as reported"]
    assert capsys.readouterr().err == "error: interrupted.\n"


def test_an_error_after_a_stop_ends_as_the_stop(python_sigint_handler, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for signum in (signal.SIGINT, signal.SIGTERM):
        with cli.stop_signals_as_keyboard_interrupt():
            assert cli._ended_by(ValueError("A bad value."), "interrupted.") == 1
            with pytest.raises(TypeError):  # an unexpected error is not hidden
                cli._ended_by(TypeError("a bug"), "interrupted.")
            try:
                try:
                    signal.raise_signal(signum)
                except KeyboardInterrupt:
                    raise TypeError("caught and replaced")  # what C code that caught it may raise instead
            except TypeError as e:
                assert cli._ended_by(e, "interrupted.") == 1
        assert capsys.readouterr().err == "error: A bad value.\nerror: interrupted.\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    with cli.stop_signals_as_keyboard_interrupt():  # each run starts with no stop received
        assert cli._ended_by(ValueError("Another."), "interrupted.") == 1
    assert capsys.readouterr().err == "error: Another.\n"

import gc
import signal
import time

import jax
import pytest

from jaxcam import cli
from jaxcam.errors import ConfigError


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


def test_only_jaxcams_own_errors_and_stops_become_one_sentence(capsys):
    def raising(error):
        def command():
            raise error
        return command

    assert cli._run(raising(ConfigError("A bad value.")), lambda: "interrupted.") == 1
    assert cli._run(raising(KeyboardInterrupt()), lambda: "interrupted.") == 1
    assert capsys.readouterr().err == "error: A bad value.\nerror: interrupted.\n"
    with pytest.raises(TypeError):  # a bug keeps its traceback
        cli._run(raising(TypeError("a bug")), lambda: "interrupted.")
    with pytest.raises(OSError):
        cli._run(raising(OSError("not ours")), lambda: "interrupted.")


def test_sigterm_stops_as_ctrl_c_inside_the_block_only():
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with cli.sigterm_as_ctrl_c():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop itself
def test_a_stop_that_python_drops_in_a_gc_callback_is_raised_again():
    # JAX runs a gc callback on every collection, and Python drops what one raises.
    def stopped_during_collection(phase, info):
        if phase == "start":
            gc.callbacks.remove(stopped_during_collection)
            signal.raise_signal(signal.SIGTERM)

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with cli.sigterm_as_ctrl_c():
            gc.callbacks.append(stopped_during_collection)
            gc.collect()
            reached.append("after the collection")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # Python bytecode, where the repeated stop lands
                pass
            reached.append("ran on")
    assert reached == ["after the collection"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from conftest import ROOT
from jaxcam.checkpoint import CheckpointError, interrupts_deferred, load_variables


@pytest.fixture
def sigterm_as_ctrl_c():
    """SIGTERM raising KeyboardInterrupt, as train.py sets it (cli.sigterm_as_ctrl_c)."""
    inherited = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, inherited)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_inside_the_block_takes_effect_when_it_ends(signum, python_sigint_handler, sigterm_as_ctrl_c):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signum)  # a real signal, handled between bytecodes
            finished.append("checkpoint")
            finished.append("history")
        finished.append("after the block")  # not reached: the interrupt takes effect first
    assert finished == ["checkpoint", "history"]
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are restored


def test_a_sigterm_with_its_default_action_ends_the_process_after_the_block(tmp_path):
    # Outside train.py (a notebook's own training, say) SIGTERM keeps its default: the process
    # ends, but only once the checkpoint block has finished.
    log = tmp_path / "log.txt"
    script = (
        "import os, signal, sys\n"
        "from jaxcam.checkpoint import interrupts_deferred\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "with open(sys.argv[1], 'w') as log:\n"
        "    with interrupts_deferred():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        log.write('checkpoint history '); log.flush()\n"
        "    log.write('after the block'); log.flush()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(log)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert log.read_text() == "checkpoint history "


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


def test_a_run_saved_on_two_devices_loads_on_one(smoke_run, tmp_path):
    # The suite runs on two host devices, so smoke_run's checkpoints were saved from both. Orbax,
    # given no target, restored onto the saving devices and refused a machine with fewer
    # ("Topology mismatch"): a run trained on 8 TPU cores could not be explained on a laptop.
    # --resume restores into a template of this machine's devices: checked here too.
    script = (
        "import sys, jax, numpy as np\n"
        "from jaxcam import train\n"
        "from jaxcam.checkpoint import Checkpointer, load_variables\n"
        "from jaxcam.configuration import config_from_json\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        "variables, meta = load_variables(sys.argv[1], 'best')\n"
        "leaves = jax.tree_util.tree_flatten_with_path(variables)[0]\n"
        "np.savez(sys.argv[2], **{jax.tree_util.keystr(k): v for k, v in leaves})\n"
        "config = config_from_json(sys.argv[1] + '/config.json')\n"
        "template = train.create_train_state(train.build(config, 10), jax.random.key(0),\n"
        "                                    train.create_optimizer(config, 100)[0])\n"
        "state, latest = Checkpointer(sys.argv[1], create=False).restore(template, 'latest')\n"
        "np.save(sys.argv[3], jax.device_get(state.params['linear']['kernel']))\n"
        "print(meta['epoch'])\n"
    )
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out, resumed = tmp_path / "one_device.npz", tmp_path / "resumed.npy"
    done = subprocess.run([sys.executable, "-c", script, str(smoke_run), str(out), str(resumed)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    variables, meta = load_variables(smoke_run, "best")
    assert json.loads(done.stdout.strip().splitlines()[-1]) == meta["epoch"]
    with np.load(out) as loaded:
        leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
        assert sorted(loaded.files) == sorted(jax.tree_util.keystr(k) for k, _ in leaves)
        for key, value in leaves:
            np.testing.assert_array_equal(loaded[jax.tree_util.keystr(key)], value)
    latest, _ = load_variables(smoke_run, "latest")
    np.testing.assert_array_equal(np.load(resumed), latest["params"]["linear"]["kernel"])


@pytest.mark.parametrize("damage", ["manifest", "truncated"])
def test_a_damaged_checkpoint_fails_in_one_sentence(damage, smoke_run, tmp_path):
    # A process of its own, as the CLIs are. Orbax may print its abandoned reads' asyncio
    # tracebacks after the sentence; the sentence is what matters.
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("report", "tensorboard"))
    if damage == "manifest":
        for manifest in (run / "checkpoints").glob("*/*/state/manifest.ocdbt"):
            manifest.unlink()
    else:
        for data_file in (run / "checkpoints").glob("*/*/state/ocdbt.process_*/d/*"):
            os.truncate(data_file, 100)
    script = (
        "import sys, jax\n"
        "from jaxcam import train\n"
        "from jaxcam.checkpoint import Checkpointer, CheckpointError, load_variables\n"
        "from jaxcam.configuration import config_from_json\n"
        "config = config_from_json(sys.argv[1] + '/config.json')\n"
        "template = train.create_train_state(train.build(config, 10), jax.random.key(0),\n"
        "                                    train.create_optimizer(config, 100)[0])\n"
        "for _ in range(3):\n"
        "    for read in (lambda: load_variables(sys.argv[1], 'best'),\n"
        "                 lambda: Checkpointer(sys.argv[1], create=False).restore(template, 'latest')):\n"
        "        try:\n"
        "            read()\n"
        "        except CheckpointError as e:\n"
        "            print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    errors = done.stdout.splitlines()
    assert len(errors) == 6 and all(re.search(r"(is|are) corrupt or", line) for line in errors), done.stdout
    assert not any("tensorstore_spec" in line for line in errors), done.stdout  # its JSON spec says nothing to the user
    # Each names the damaged store: tensorstore's own error, not orbax's wrapper of it ("Encountered
    # error while reading array index: (slices). See full TensorStore details: <bound method ...").
    assert all(f"{run}/checkpoints/" in line and "/state/" in line for line in errors), done.stdout
    assert not any("TensorStore details" in line for line in errors), done.stdout


def test_a_folder_without_checkpoints_is_named(smoke_run, tmp_path):
    with pytest.raises(CheckpointError, match=f"No best checkpoint folder in {str(tmp_path)!r}; is it a jaxcam run "
                                              r"directory\?"):
        load_variables(tmp_path)
    # A run whose best folder was deleted keeps its latest one, which still loads.
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("report", "tensorboard"))
    shutil.rmtree(run / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match="No best checkpoint folder in"):
        load_variables(run, "best")
    assert load_variables(run, "latest")[1]["epoch"] == 2

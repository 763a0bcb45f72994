"""Crash safety: SIGKILL at any moment, a torn latest checkpoint, a full disk; `--resume` ends each
with the model and history of an uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest

import train as train_cli
from conftest import ROOT, cli_command
from jaxcam.checkpoint import checkpoint_folder, load_variables

# Three epochs of three steps; the times vary from run to run, so they are left out of the comparisons.
RUN = ["--config", ROOT / "configs" / "smoke.py", "--config.width=4", "--config.epochs=3", "--config.batch_size=32",
       "--config.eval_batch_size=16", "--config.tensorboard=False"]
TIMES = ("epoch_time", "data_wait")


def history_without_times(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in json.loads((run_dir / "history.json").read_text())]


def assert_same_run(run_dir, reference) -> None:
    """`run_dir` ended with `reference`'s parameters, BatchNorm statistics and history, bit for bit."""
    assert history_without_times(run_dir) == history_without_times(reference)
    for which in ("latest", "best"):
        (got, got_meta), (want, want_meta) = load_variables(run_dir, which), load_variables(reference, which)
        assert got_meta["epoch"] == want_meta["epoch"]
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def uninterrupted(official_folder, tmp_path_factory):
    """The run every test here must end equal to, trained once in-process."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert train_cli.main(["--workdir", str(workdir), *map(str, RUN), f"--config.data_dir={str(official_folder)!r}"]) == 0
    (run_dir,) = workdir.iterdir()
    return run_dir


class Output:
    """What a process prints (stdout and stderr together), collected on a thread as it comes."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(4096):
            self.text += chunk.decode(errors="replace")


def kill_when(process, ready, delay: float) -> bool:
    """SIGKILL `process` `delay` seconds after `ready()` holds; False if it ended first."""
    deadline = time.monotonic() + 300
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def test_sigkill_at_random_moments_then_resume_ends_as_the_uninterrupted_run(official_folder, uninterrupted,
                                                                               tmp_path):
    seed = time.time_ns()  # other moments on every run; printed, to replay one
    rng = random.Random(seed)
    # Each phase: when the moment comes, from what the process prints or writes; then a random delay.
    phases = {
        "during a step": (lambda out, ckpts: "Epoch " in out, 0.3),
        "during evaluation": (lambda out, ckpts: " 3/3 [" in out, 0.05),
        "during a checkpoint write": (lambda out, ckpts: "Test set:" in out, 0.05),
        "during the history write": (lambda out, ckpts: ckpts(), 0.0),
    }
    workdir = tmp_path / "runs"
    command = cli_command("train.py", "--workdir", workdir, *RUN, f"--config.data_dir={str(official_folder)!r}")
    landed = []
    # Every phase once in a random order, then one more at random.
    for phase in rng.sample(list(phases), len(phases)) + rng.choices(list(phases), k=1):
        before = {p.name for p in workdir.glob("*/checkpoints/latest/*")}
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output = Output(process)
        moment, longest = phases[phase]

        def new_checkpoint() -> bool:  # a latest checkpoint this process completed: its history write follows
            return any(p.name.isdigit() and p.name not in before for p in workdir.glob("*/checkpoints/latest/*"))

        if kill_when(process, lambda: moment(output.text, new_checkpoint), rng.uniform(0, longest)):
            landed.append(phase)
        else:
            assert process.wait() == 0, (seed, output.text[-3000:])
            break
        if command[-1] != "--resume":
            (run_dir,) = workdir.iterdir()
            command = cli_command("train.py", "--resume", run_dir)
    print(f"SIGKILL at {len(landed)} points (seed {seed}): {', '.join(landed)}")
    assert len(landed) >= 3, (seed, landed)  # the run is long enough for most kills to land in it
    (run_dir,) = workdir.iterdir()
    assert train_cli.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, uninterrupted)


def test_a_torn_latest_checkpoint_is_skipped_for_the_one_before(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    torn = checkpoint_folder(run_dir, "latest") / "3"
    largest = max((p for p in torn.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)  # what an interrupted copy or a failing disk leaves
    assert train_cli.main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"The latest checkpoint of epoch 3 in {str(torn.parent)!r} is corrupt or does not match this model (" in out
    assert "; trying the one before it." in out and f"Resuming {run_dir} after epoch 2." in out
    assert_same_run(run_dir, uninterrupted)


def test_a_full_disk_during_a_checkpoint_write_stops_in_one_sentence_and_keeps_the_one_before(uninterrupted,
                                                                                            tmp_path, capsys):
    # A run killed after epoch 2: its latest checkpoints are of epochs 1 and 2.
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for which in ("latest", "best"):
        for folder in checkpoint_folder(run_dir, which).glob("3"):
            shutil.rmtree(folder)
    # Tensorstore spreads the data over smaller files when one would grow past the limit, so the
    # limit is below the size of the checkpoint's metadata files.
    small_disk = ["prlimit", "--fsize=16384", *cli_command("train.py", "--resume", run_dir)]
    done = subprocess.run(small_disk, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Tensorstore's threads may print tracebacks of the writes that the failed save abandoned
    # (even across the sentence's line), so the sentence is looked for in the whole of stderr.
    assert done.returncode == 1
    assert (f"error: Cannot write the checkpoint of epoch 3 in {str(run_dir / 'checkpoints')!r} "
            "(File too large); the checkpoint of epoch 2 is kept.") in done.stderr
    assert [r["epoch"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 2]
    assert train_cli.main(["--resume", str(run_dir)]) == 0
    assert f"Resuming {run_dir} after epoch 2." in capsys.readouterr().out
    assert_same_run(run_dir, uninterrupted)

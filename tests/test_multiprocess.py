"""Many hosts: real train.py processes joined by jax.distributed on 127.0.0.1 (gloo collectives)."""

import os
import signal
import socket
import subprocess
import time

import pytest

import train as train_cli
from conftest import ROOT, cli_command
from jaxcam import distributed
from test_crash_safety import Output, assert_same_run

# Three epochs of six steps; each process of two builds half of every batch of 16.
RUN = ["--config", ROOT / "configs" / "smoke.py", "--config.width=4", "--config.epochs=3", "--config.batch_size=16",
       "--config.eval_batch_size=16", "--config.tensorboard=False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(*args, count: int = 2) -> list[tuple[subprocess.Popen, Output]]:
    """`count` train.py processes of one run, each with one CPU device, printing into an Output."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}  # one device each, not the suite's two
    started = []
    for index in range(count):
        command = cli_command("train.py", *args, "--coordinator_address", address, "--num_processes", count,
                              "--process_id", index)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append((process, Output(process)))
    return started


def wait_all(started, timeout: float = 300) -> list[int]:
    try:
        return [process.wait(timeout=timeout) for process, _ in started]
    finally:
        for process, _ in started:
            process.kill()


@pytest.fixture(scope="module")
def two_process_run(official_folder, tmp_path_factory):
    """A run of two processes of one device each, to its end: (run directory, their outputs)."""
    workdir = tmp_path_factory.mktemp("two_processes")
    started = start_processes("--workdir", workdir, *RUN, f"--config.data_dir={official_folder}")
    codes = wait_all(started)
    outputs = [output.text for _, output in started]
    assert codes == [0, 0], outputs
    (run_dir,) = workdir.iterdir()  # process 0 named it, and both wrote into it
    return run_dir, outputs


def test_two_processes_train_as_one_process_with_two_devices(two_process_run, official_folder, tmp_path, capsys):
    run_dir, (main_output, other_output) = two_process_run
    # This process has the suite's two CPU devices: the same global batch on one process.
    assert train_cli.main(["--workdir", str(tmp_path), *map(str, RUN), f"--config.data_dir={official_folder}"]) == 0
    one_process = next(tmp_path.iterdir())
    # Measured: equal bit for bit, on this CPU (gloo's sum of two halves is the in-process one).
    assert_same_run(run_dir, one_process)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in one_process.iterdir())
    # Only process 0 prints the run; the other says nothing of its own.
    assert main_output.count("Run directory:") == 1 and main_output.count("Test set:") == 3
    assert "Test set:" not in other_output and "Epoch " not in other_output and "error" not in other_output


def test_a_killed_process_stops_the_other_in_one_sentence_and_resume_finishes_the_run(two_process_run,
                                                                                      official_folder, tmp_path):
    started = start_processes("--workdir", tmp_path, *RUN, f"--config.data_dir={official_folder}")
    (main, main_output), (other, _) = started
    try:
        deadline = time.monotonic() + 300
        while "Epoch 2/3" not in main_output.text:  # in epoch 2's steps, with epoch 1 saved
            assert main.poll() is None and time.monotonic() < deadline, main_output.text
            time.sleep(0.01)
        other.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = main.wait(timeout=distributed.HEARTBEAT_TIMEOUT_S + 30)
        waited = time.monotonic() - killed
    finally:
        wait_all(started, timeout=5)
    print(f"process 0 stopped {waited:.1f} s after process 1 was killed")
    (run_dir,) = tmp_path.iterdir()
    assert code == 1
    assert ("error: another process of this run stopped or lost contact (" in main_output.text
            and f"), so this one stopped too; python train.py --resume {run_dir}, started in every process as "
                "this run was, continues from the last epoch that ended." in main_output.text), main_output.text
    assert "Traceback" not in main_output.text
    resumed = start_processes("--resume", run_dir)
    assert wait_all(resumed) == [0, 0], [output.text for _, output in resumed]
    assert "Resuming " in resumed[0][1].text
    assert_same_run(run_dir, two_process_run[0])


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"], "--coordinator_address and --process_id must be given with --num_processes."),
    (["--num_processes", "2", "--process_id", "2", "--coordinator_address", "127.0.0.1:1"],
     "--process_id must lie in 0..1 for --num_processes 2, got 2."),
    (["--num_processes", "2", "--process_id", "0", "--coordinator_address", "localhost"],
     "--coordinator_address must be HOST:PORT (process 0's), got 'localhost'."),
    (["--distributed", "--process_id", "0"], "--distributed detects the processes itself, so drop --process_id."),
])
def test_process_flags_that_cannot_work_stop_in_one_sentence(flags, message, tmp_path, capsys):
    assert train_cli.main(["--workdir", str(tmp_path / "runs"), *flags]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_distributed_without_a_cluster_and_find_lr_across_processes_are_refused(official_folder, tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    alone = subprocess.run(cli_command("train.py", "--workdir", tmp_path, "--distributed"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 1
    assert alone.stderr.startswith("error: --distributed found no TPU pod slice, SLURM or Open MPI job to join (")
    assert alone.stderr.endswith("); name the processes with --coordinator_address, --num_processes and "
                                 "--process_id instead.\n")
    started = start_processes("--workdir", tmp_path, *RUN, f"--config.data_dir={official_folder}", "--find-lr")
    assert wait_all(started) == [1, 1]
    assert ("error: The LR range test runs in one process: run train.py --find-lr-only on one host, then train on "
            "all of them with --config.max_lr set to its suggestion.") in started[0][1].text
    assert not list(tmp_path.iterdir())

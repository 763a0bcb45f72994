"""Shared setup for the tests in tests/: two host
CPU devices (real data-parallel path), a persistent compilation cache, headless matplotlib, and
small real/synthetic datasets."""

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Must happen before JAX initializes its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for this process and the train.py / explain.py processes it starts,
# so that a program compiled once in the session is loaded, not compiled again, wherever it runs.
ROOT = Path(__file__).resolve().parent.parent
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# pyproject's `pythonpath = ["."]` puts the repository root on sys.path, so `configs`, `train`,
# `explain` and `bench` import from there.
from configs import shared_subset  # noqa: E402
from jaxcam import data as data_lib  # noqa: E402

SUBSET = shared_subset()  # ../shared/data/cifar10-subset, or None where this clone has no ../shared


def write_official_batches(folder: Path, images: np.ndarray, labels: np.ndarray, test_images, test_labels) -> Path:
    """Write arrays in the official `cifar-10-batches-py` format (pickled dicts, planar rows)."""
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows}, f)

    for i, (x, y) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)), start=1):
        dump(f"data_batch_{i}", x, y)
    dump("test_batch", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in data_lib.CIFAR10_CLASSES], b"num_cases_per_batch": 10000}, f)
    return folder


def synthetic_arrays(n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.int32),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.int32),
    )


def write_tfrecord_cifar10_metadata(data_dir: Path) -> Path:
    """The metadata tensorflow-datasets writes for a cifar10 it prepared as TFRecord (tfds.load's
    default), written by tfds itself into `data_dir`; returns its `cifar10/<version>/` folder.
    Its shards are left out: they are not needed to tell the format, and writing them needs TensorFlow."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=data_dir, file_format="tfrecord")
    version_dir = Path(builder.data_dir)
    version_dir.mkdir(parents=True)
    builder.info.write_to_directory(version_dir)
    return version_dir


def tfrecord_copy_error(version_dir: Path) -> str:
    """How loading the copy of `write_tfrecord_cifar10_metadata` fails: without TensorFlow, named
    as TFRecord; with it, read through TensorFlow, which finds no shards (the start of the sentence)."""
    if importlib.util.find_spec("tensorflow") is None:
        return (f"CIFAR-10 in {str(version_dir)!r} was prepared as TFRecord files, which only TensorFlow reads: "
                "install it (pip install tensorflow) or give --config.tfds_data_dir another folder, where "
                "tensorflow-datasets prepares CIFAR-10 as array_record.")
    return f"Could not read CIFAR-10's TFRecord files in {str(version_dir)!r} ("


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of the session, in this process and in the commands it starts, go under
    pytest's own temporary tree, which pytest prunes: tensorflow-datasets makes a folder in the
    system's temporary directory for each builder of an unprepared copy and never removes it."""
    folder = str(tmp_path_factory.mktemp("tempfile"))  # pytest's tree itself is placed first
    with pytest.MonkeyPatch.context() as patch:  # restores both afterwards
        patch.setattr(tempfile, "tempdir", folder)
        patch.setenv("TMPDIR", folder)
        yield


@pytest.fixture(scope="session")
def official_folder(tmp_path_factory) -> Path:
    """A generated `cifar-10-batches-py/` folder with 100 train and 30 test images."""
    root = tmp_path_factory.mktemp("cifar")
    return write_official_batches(root / "cifar-10-batches-py", *synthetic_arrays(100, 30))


@pytest.fixture(scope="session")
def official_archive(official_folder: Path, tmp_path_factory) -> Path:
    """The same data as `cifar-10-python.tar.gz`."""
    archive = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(official_folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture(scope="session")
def real_subset() -> data_lib.Cifar10:
    """The real CIFAR-10 subset from ../shared when present (skipped otherwise)."""
    if SUBSET is None:
        pytest.skip("../shared/data/cifar10-subset is not present")
    return data_lib.load_cifar10(SUBSET)


@pytest.fixture(scope="session")
def tiny_dataset(request) -> data_lib.Cifar10:
    """128 training and 40 test images: real ones from ../shared when present, else synthetic.

    The tests that use it (data-parallel step, resume, NaN stop, range test) check properties of
    the training machinery, so they must run in a clone that has no ../shared beside it too.
    """
    if SUBSET is not None:
        d = request.getfixturevalue("real_subset")  # the session's one load of the subset
        return data_lib.Cifar10(d.train_images[:128], d.train_labels[:128], d.test_images[:40], d.test_labels[:40],
                                d.class_names)
    return data_lib.Cifar10(*synthetic_arrays(128, 40, seed=1), data_lib.CIFAR10_CLASSES)


@pytest.fixture(scope="session")
def smoke_run(official_folder, tmp_path_factory) -> Path:
    """One tiny real training run (train.py in-process) shared by the explain and LR tests."""
    import train as train_cli

    workdir = tmp_path_factory.mktemp("runs")
    code = train_cli.main([
        "--workdir", str(workdir), "--config", str(ROOT / "configs" / "smoke.py"), "--config.width=4",
        "--config.epochs=2", "--config.batch_size=32", "--config.eval_batch_size=16",
        f"--config.data_dir={str(official_folder)!r}",
    ])
    assert code == 0
    (run_dir,) = workdir.iterdir()
    return run_dir


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test: a process started in the background by a
    non-interactive shell (as CI may start the suite) inherits SIGINT ignored instead."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def sigterm_once(command: list[str], ready, env: dict | None = None) -> tuple[int, str]:
    """Run `command` from the repository root, send it SIGTERM once `ready(process)` returns (it
    waits for the moment), and return the exit status and stderr."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready(process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, err


def once_present(folder: Path, pattern: str):
    """A `ready` for sigterm_once: wait until `folder` holds a match of `pattern`, or the process ended."""
    def ready(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while not list(folder.glob(pattern)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    return ready


def cli_command(script: str, *args) -> list[str]:
    """`python <repository>/<script> args...` as a subprocess command."""
    return [sys.executable, str(ROOT / script), *map(str, args)]

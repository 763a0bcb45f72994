"""Orbax checkpoints of a run: `checkpoints/latest` (every epoch) and `checkpoints/best`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcam.errors import CheckpointError, WriteError


# The checkpoints each run keeps, as folders under <run_dir>/checkpoints.
KINDS = ("best", "latest")


def checkpoint_folder(run_dir: str | os.PathLike, which: str) -> Path:
    """`<run_dir>/checkpoints/<which>`, the folder of a run's "latest" or "best" checkpoints."""
    return Path(run_dir).absolute() / "checkpoints" / which


def _manager(directory: Path, create: bool, keep: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    # Named handlers, so that a step's metadata (shapes, dtypes) can be read before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class Checkpointer:
    """Keeps the two latest checkpoints and the best (highest test accuracy) one of a run.

    Orbax writes each checkpoint to a temporary folder and renames it when complete, and removes
    the oldest only after that, so an interrupted save never replaces a good checkpoint; the one
    before the latest is kept as well, for a latest that a failing disk or copy tore afterwards.
    """

    def __init__(self, run_dir: str | os.PathLike, create: bool = True):
        self.latest = _manager(checkpoint_folder(run_dir, "latest"), create, keep=2)
        self.best = _manager(checkpoint_folder(run_dir, "best"), create)

    def save(self, epoch: int, state: Any, info: dict[str, Any], is_best: bool) -> None:
        """Save `state` (a flax struct, e.g. TrainState) after `epoch` (1-based), with `info`
        (JSON values: test metrics, the history) in its meta, and wait until it is on disk.

        The best one first: a run stopped between the two saves resumes from the latest before
        and saves this epoch again. WriteError if the disk refuses it (full, or a file size limit).
        """
        # One device's copy of the replicated state: saved as it is, orbax compiled a slice of every
        # array (some 34 XLA programs a run) to pick the replica it writes. With several processes,
        # every one saves the global arrays and orbax has one replica written.
        tree = flax.serialization.to_state_dict(state)
        if jax.process_count() == 1:
            tree = jax.tree_util.tree_map(_one_replica, tree)
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"epoch": epoch, **info}))
        for manager in [self.best, self.latest] if is_best else [self.latest]:
            if epoch in manager.all_steps():  # saved before a stop, then restored from an earlier epoch
                manager.delete(epoch)
            try:
                with _orbax_quiet():
                    manager.save(epoch, args=args, force=True)
                    manager.wait_until_finished()
            except Exception as e:
                reason = _refused_write(e)
                if reason is None:
                    raise
                kept = self.latest.latest_step()
                raise WriteError(f"Cannot write the checkpoint of epoch {epoch} in {str(manager.directory.parent)!r} "
                                 f"({reason}); "
                                 + (f"the checkpoint of epoch {kept} is kept." if kept else "no checkpoint is kept.")
                                 ) from None

    def close(self) -> None:
        """Finish pending saves and release both managers."""
        for manager in (self.latest, self.best):
            manager.close()

    def latest_epoch(self, which: str = "latest") -> int | None:
        """The newest epoch saved as `which` ("latest" or "best"), or None before the first save."""
        return getattr(self, which).latest_step()

    def restore(self, template: Any, which: str = "latest",
                log: Callable[[str], None] | None = None) -> tuple[Any, dict]:
        """Restore the newest `which` checkpoint that reads back whole into the structure of
        `template` (shapes/dtypes/shardings); returns (state, meta). Each one skipped is said to `log`."""
        manager = getattr(self, which)
        epochs = sorted(manager.all_steps(), reverse=True)
        if not epochs:
            raise CheckpointError(f"No {which} checkpoint in {str(manager.directory)!r}.")
        target = flax.serialization.to_state_dict(template)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        problems = []
        for epoch in epochs:
            try:
                restored = _restore(manager, epoch, abstract)
                state = flax.serialization.from_state_dict(template, restored["state"])
            except Exception as e:
                problems.append(f"epoch {epoch}: {_reason(e)}")
                if log is not None and epoch != epochs[-1]:
                    log(f"The {which} checkpoint of epoch {epoch} in {str(manager.directory)!r} is corrupt or does "
                        f"not match this model ({_reason(e)}); trying the one before it.")
                continue
            return state, dict(restored["meta"])
        raise CheckpointError(
            f"The {which} checkpoint{'s' if len(epochs) > 1 else ''} in {str(manager.directory)!r} "
            f"{'are' if len(epochs) > 1 else 'is'} corrupt or do{'' if len(epochs) > 1 else 'es'} not match this "
            f"model ({'; '.join(problems)})."
        )


def has_finished_epoch(run_dir: str | os.PathLike, epoch: int) -> bool:
    """Whether the latest checkpoint of `epoch` is complete on disk, without opening a manager
    (orbax gives a save's folder the epoch as its name once the save is complete)."""
    return (checkpoint_folder(run_dir, "latest") / str(epoch)).is_dir()


# The signals that stop a run: Ctrl-C, and the SIGTERM of `kill`, `timeout`, a batch scheduler's
# time limit or a preempted cloud VM (train.py turns it into a KeyboardInterrupt too), and the
# SIGALRM with which train.py repeats a stop that Python dropped.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block whole: a SIGINT (Ctrl-C) or SIGTERM that arrives inside it takes effect when it ends.

    Around an epoch's checkpoint and history, so that both are written or neither: a
    KeyboardInterrupt inside orbax's save left its asyncio loop half-made (a traceback after
    the one-sentence error, and no checkpoint), or a checkpoint without its history record.
    After the block each signal received is raised again under the handler it had before, so
    it does what it would have done: raise KeyboardInterrupt, stop the process, or nothing
    when ignored. Signals can only be handled in the main thread; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    # A handler installed from C reads as None and could not be put back: such a signal is left alone.
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS if signal.getsignal(signum) is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # runs a Python handler before it returns


def load_variables(run_dir: str | os.PathLike, which: str = "best") -> tuple[dict, dict]:
    """The model variables `{'params', 'batch_stats'}` (numpy) of a run's checkpoint, and its meta.

    No model or optimizer template is needed: the stored tree is read as it is. `which` is one
    of KINDS.
    """
    directory = checkpoint_folder(run_dir, which)
    if not directory.is_dir():
        raise CheckpointError(f"No {which} checkpoint folder in {str(Path(run_dir))!r}; is it a jaxcam run directory?")
    manager = _manager(directory, create=False)
    epoch = manager.latest_step()
    if epoch is None:
        # What a run stopped during its first epoch leaves.
        raise CheckpointError(f"No complete {which} checkpoint in {str(directory)!r}: no epoch of this run has "
                              "ended yet; train.py --resume continues it.")
    try:
        restored = _restore(manager, epoch)
        state = restored["state"]
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        variables = jax.tree_util.tree_map(np.asarray, variables)
    except Exception as e:
        raise CheckpointError(
            f"The {which} checkpoint of epoch {epoch} in {str(directory)!r} is corrupt or unreadable "
            f"({_reason(e)})."
        ) from None
    finally:
        manager.close()
    return variables, dict(restored["meta"])


def _restore(manager: ocp.CheckpointManager, epoch: int, abstract_state: Any = None) -> Any:
    """{'state', 'meta'} of checkpoint `epoch`, the state read into `abstract_state` (a tree of
    jax.ShapeDtypeStruct with shardings) or, if None, as stored onto one host device."""
    if abstract_state is None:
        # Without a target, orbax restores onto the devices that saved the checkpoint, and refuses
        # ("Topology mismatch") a run trained on more devices than this machine has.
        one_device = jax.sharding.SingleDeviceSharding(_host_device())
        abstract_state = jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
            manager.item_metadata(epoch)["state"])
    return manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    """Orbax logs a failed save's traceback from each of its threads before raising it; the raised
    error is what tells the user (or, if it is a bug, keeps its traceback)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_replica(leaf: Any) -> Any:
    """A fully replicated jax.Array's copy on its first device (other leaves as they are)."""
    if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
        return leaf.addressable_data(0)
    return leaf


def _refused_write(e: BaseException) -> str | None:
    """The operating system's reason ("No space left on device") if `e` is a refused write,
    raised by Python or by tensorstore (whose errors are ValueErrors carrying the errno), else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.strerror or os.strerror(e.errno)
        if code := re.search(r"os_error_code='(\d+)'", str(e)):
            return os.strerror(int(code[1]))
        e = e.__cause__ or e.__context__
    return None


def _host_device() -> jax.Device:
    """The CPU, or the first local device where JAX_PLATFORMS leaves out the CPU backend."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def _reason(e: BaseException) -> str:
    """'Type: first line' of the error at the root of `e`'s chain of causes, at most 300 characters."""
    # Orbax wraps tensorstore's error in "Encountered error while reading array index: (slices).
    # See full TensorStore details: <its spec>", which names neither the file nor what is wrong
    # with it; the error it was raised from does ("Requested byte range ... is not valid").
    while e.__cause__ is not None:
        e = e.__cause__
    # tensorstore appends its whole JSON spec to a message, which says nothing to the user.
    text = re.split(r"\s*\[?tensorstore_spec", str(e))[0].strip()
    first = f"{type(e).__name__}: {text.splitlines()[0] if text else 'no details'}"
    return first if len(first) <= 300 else first[:299] + "…"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically: a crash mid-write leaves the previous file intact. WriteError if the
    disk refuses it (full, read-only, a file size limit)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"Cannot write {str(path)!r} ({e.strerror or e}).") from None


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, the deepest first: what
    `make_writable_folder(path)` would make, for `remove_if_empty` to take back."""
    path = Path(path)
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (the deepest first) that is empty: a command stopped or failed
    before it wrote anything leaves no empty folder behind, and whatever a folder holds stays."""
    for folder in folders:
        with contextlib.suppress(OSError):  # missing, or not empty
            folder.rmdir()


def make_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """Create `path` if needed and check that files can be written in it, before any work is
    done; WriteError naming `what` (e.g. "workdir") and the reason if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".jaxcam_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        # mkdir says only "File exists" or "Not a directory" when the path, or a folder on it, is a file.
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{str(file)!r} is a file, not a folder" if file is not None else e.strerror or e
        raise WriteError(f"Cannot write to {what} {str(path)!r} ({reason}).") from None
    return path

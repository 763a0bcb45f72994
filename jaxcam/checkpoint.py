"""Orbax checkpoints of a run: `checkpoints/latest` (every epoch) and `checkpoints/best`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

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


def _manager(directory: Path, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
    # Named handlers, so that a step's metadata (shapes, dtypes) can be read before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class Checkpointer:
    """Keeps the latest and the best (highest test accuracy) checkpoint of a run.

    Orbax writes each checkpoint to a temporary folder and renames it when complete, so an
    interrupted save never replaces the previous good checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike, create: bool = True):
        self.latest = _manager(checkpoint_folder(run_dir, "latest"), create)
        self.best = _manager(checkpoint_folder(run_dir, "best"), create)

    def save(self, epoch: int, state: Any, info: dict[str, Any], is_best: bool) -> None:
        """Save `state` (a flax struct, e.g. TrainState) after `epoch` (1-based), with `info`
        (JSON values: test metrics, the compute dtype) in its meta."""
        tree = flax.serialization.to_state_dict(state)
        meta = {"epoch": epoch, **info}
        managers = [self.latest, self.best] if is_best else [self.latest]
        for manager in managers:
            manager.save(
                epoch,
                args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def wait(self) -> None:
        """Block until the asynchronous saves of both managers are on disk."""
        for manager in (self.latest, self.best):
            manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release both managers."""
        for manager in (self.latest, self.best):
            manager.close()

    def latest_epoch(self, which: str = "latest") -> int | None:
        """The newest epoch saved as `which` ("latest" or "best"), or None before the first save."""
        return getattr(self, which).latest_step()

    def restore(self, template: Any, which: str = "latest") -> tuple[Any, dict]:
        """Restore into the structure of `template` (shapes/dtypes/shardings); returns (state, meta)."""
        manager = getattr(self, which)
        epoch = manager.latest_step()
        if epoch is None:
            raise CheckpointError(f"No {which} checkpoint in {str(manager.directory)!r}.")
        target = flax.serialization.to_state_dict(template)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = _restore(manager, epoch, abstract)
            state = flax.serialization.from_state_dict(template, restored["state"])
        except Exception as e:
            raise CheckpointError(
                f"The {which} checkpoint of epoch {epoch} in {str(manager.directory)!r} is corrupt or does "
                f"not match this model ({_reason(e)})."
            ) from None
        return state, dict(restored["meta"])


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
    """Write JSON atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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

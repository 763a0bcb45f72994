"""Data-parallel training of CIFAR ResNets: optimizer, train/eval steps, the epoch loop.

The steps have pmap semantics, built with `jax.jit` over `jax.shard_map` on a one-axis
device `Mesh` named 'batch': each device holds a replica of the state and a slice of the
global batch; gradients, metrics and BatchNorm statistics are averaged with `lax.pmean`
over 'batch'. The same code runs on 1 CPU, 1 GPU or 8 TPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxcam import data as data_lib
from jaxcam._checks import (check_class_indices, check_classes, check_flag, check_non_negative_integer,
                            check_positive_integer, class_names_problem, history_problem, is_integer, is_number,
                            is_path, kind_of)
from jaxcam import models
from jaxcam.checkpoint import Checkpointer, CheckpointError, interrupts_deferred, make_writable_folder, write_json
from jaxcam.configuration import CONFIG_KEYS, DATA_KEYS, ConfigError, check_keys, config_from_json
from jaxcam.schedules import onecycle

__all__ = [
    "TrainState", "TrainingDiverged", "onecycle", "create_optimizer", "create_train_state",
    "make_mesh", "make_train_step", "make_predict_fn", "evaluate", "train_and_evaluate",
]

AXIS = "batch"
OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str, backend: str | None = None, compute_capability: str | None = None) -> str:
    """The compute dtype that config.dtype `name` means on `backend` (default: JAX's, with its
    first device's CUDA `compute_capability`, such as "7.5").

    "auto" is bfloat16 on TPUs and on GPUs with bfloat16 matrix units (NVIDIA Ampere, compute
    capability 8.0, and later), which run it at twice the float32 (TF32) rate (73.5k against
    36.7k images/s on an H100, bench/RESULTS.md). Older GPUs, such as Colab's T4 (7.5) and the
    V100 (7.0), have none: XLA emulates bfloat16 there, and a bfloat16 matmul on a T4 ran at
    about half float32's speed (jax-ml/jax#21212), so "auto" is float32 on them, as on CPUs,
    which have no fast bfloat16 arithmetic either. Parameters stay float32 either way.
    """
    if name == "auto":
        if backend is None:  # this machine's
            backend = jax.default_backend()
            compute_capability = getattr(jax.devices()[0], "compute_capability", None)
        if backend == "gpu" and _version_below(compute_capability, 8):
            return "float32"
        return "bfloat16" if backend in ("gpu", "tpu") else "float32"
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}.")
    return name


def _version_below(version: str | None, major: int) -> bool:
    """Whether a "major.minor" CUDA compute capability is below `major`; False if unknown (ROCm names a gfx target)."""
    try:
        return int(str(version).split(".")[0]) < major
    except ValueError:
        return False


class TrainState(train_state.TrainState):
    """Flax TrainState plus the BatchNorm running statistics."""

    batch_stats: Any = None


class TrainingDiverged(RuntimeError):
    """The training loss, or the model's outputs on the test images, became NaN or infinite."""


# ----------------------------------------------------------------------------- optimizer


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `config` with its one-cycle (or constant) schedule; returns (tx, lr_schedule).

    SGD (momentum, nesterov) and Adam apply weight decay as L2 on the gradient, like
    PyTorch's `weight_decay`; AdamW decays decoupled, like `torch.optim.AdamW`. With
    `cycle_momentum`, SGD momentum / Adam beta1 follows the one-cycle momentum schedule.
    """
    name = config.optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    max_lr = _resolved_max_lr(config)
    if config.schedule == "onecycle":
        lr, momentum = onecycle(
            total_steps,
            max_lr,
            pct_start=config.pct_start,
            div_factor=config.div_factor,
            final_div_factor=config.final_div_factor,
            anneal_strategy=config.anneal_strategy,
            three_phase=config.three_phase,
            base_momentum=config.base_momentum,
            max_momentum=config.max_momentum,
        )
        if not config.cycle_momentum:
            momentum = config.momentum
    elif config.schedule == "constant":
        lr, momentum = optax.constant_schedule(max_lr), config.momentum
    else:
        raise ValueError(f"Unknown schedule {config.schedule!r}; choose 'onecycle' or 'constant'.")
    return optimizer_with_schedule(config, lr, momentum), lr


def _resolved_max_lr(config: ml_collections.ConfigDict) -> float:
    """config.max_lr as a float, or ValueError: "auto" is for the LR range test to resolve before
    an optimizer is made (float() had failed on it in its own words), and a string such as "0.1"
    would have been read as the number it spells."""
    if config.max_lr == "auto":
        raise ValueError("config.max_lr is 'auto': run the LR range test first (train.py --find-lr, or "
                         "lr_finder.run_for_config in code).")
    if not (is_number(config.max_lr) and config.max_lr > 0):
        raise ValueError(f"max_lr must be a positive number, got {config.max_lr!r}.")
    return float(config.max_lr)


def optimizer_with_schedule(
    config: ml_collections.ConfigDict, lr: float | optax.Schedule, momentum: float | optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by `config.optimizer` with the given learning rate and momentum/beta1."""
    name = config.optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    wd = config.weight_decay
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd),
            optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum, nesterov=config.nesterov),
        )
    if name == "adam":
        return optax.chain(
            optax.add_decayed_weights(wd),
            optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=momentum, b2=config.beta2),
        )
    return optax.inject_hyperparams(optax.adamw)(learning_rate=lr, b1=momentum, b2=config.beta2, weight_decay=wd)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (N,) of float32 logits (N, K) and int labels (N,).

    Labels outside 0..K-1 are refused when they are concrete; under jit, where no check can see
    their values, they score a NaN loss (the training data's labels were checked when its
    Cifar10 was built).
    """
    if not (is_number(label_smoothing) and 0 <= label_smoothing < 1):  # as config.label_smoothing
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}.")
    # one_hot makes an all-zero target of a label it has no class for (10 of 10 classes, or 0.5),
    # which scores a loss of 0 without a word; shapes and dtype are known even under jit.
    if jnp.ndim(logits) != 2 or jnp.shape(labels) != jnp.shape(logits)[:1]:
        raise ValueError(f"cross_entropy takes logits (N, K) and one label per row (N,), got shapes "
                         f"{jnp.shape(logits)} and {jnp.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"cross_entropy takes integer class labels, got {jnp.result_type(labels)}.")
    if not isinstance(labels, jax.core.Tracer):  # concrete labels (not under jit) can be checked in full
        check_classes(np.asarray(labels), jnp.shape(logits)[1])
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    # Under jit an all-zero one-hot target would score 0 (or the smoothing term alone) without a
    # word; NaN cannot pass unseen, and train.py stops on it. Adding 0 keeps valid rows and their
    # gradients exact, and training bit for bit as before (a jnp.where select had changed XLA's
    # fusion, so the training's roundoff).
    valid = (labels >= 0) & (labels < logits.shape[-1])
    return loss + jnp.where(valid, 0.0, jnp.nan)


def create_train_state(
    model: models.ResNet, rng: jax.Array, tx: optax.GradientTransformation
) -> TrainState:
    """A fresh TrainState: the model's initial parameters and BatchNorm statistics, `tx`'s state."""
    variables = models.init_variables(model, rng)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )


# ----------------------------------------------------------------------------- steps


def make_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh 'batch' over `devices` (default: all local devices)."""
    devices = devices if devices is not None else jax.local_devices()
    if len(devices) == 0:
        # A mesh of no devices was made, and failed only at the first step, in jit's words.
        raise ValueError("make_mesh needs at least one device (None means all local devices).")
    return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of `mesh` (one replica each)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split the leading axis of each array in `batch` over the mesh's devices."""
    devices = mesh.devices.size
    for array in jax.tree_util.tree_leaves(batch):
        if np.shape(array)[0] % devices:  # else JAX's IndivisibleError, in sharding terms
            raise ValueError(f"A batch of {np.shape(array)[0]} images does not split over the {devices} devices; "
                             f"give batches of a multiple of {devices}.")
    return jax.device_put(batch, NamedSharding(mesh, P(AXIS)))


def make_train_step(
    model: models.ResNet,
    mesh: Mesh,
    mean: np.ndarray,
    std: np.ndarray,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """jit(shard_map(step)): (state, uint8 images (B, 32, 32, 3), labels (B,)) -> (state, metrics).

    Each device normalizes its slice, runs the model with BatchNorm synchronized over
    'batch' (so the update equals the single-device update for the same global batch), and
    the gradients, metrics and new BatchNorm statistics are `pmean`-ed. The state buffers
    are donated.
    """
    synced = model.clone(bn_axis_name=AXIS)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        x = data_lib.normalize(images, mean, std)

        def loss_fn(params):
            logits, updates = synced.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        # Differentiate with respect to a per-device ("varying") view of the replicated
        # parameters, so each device gets the gradient of its own slice (pmap semantics) and the
        # pmean below is the one averaging over devices. (Differentiating the replicated params
        # directly would make shard_map psum the cotangents implicitly.)
        local_params = jax.lax.pcast(state.params, AXIS, to="varying")
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
        grads = jax.lax.pmean(grads, AXIS)
        batch_stats = jax.lax.pmean(batch_stats, AXIS)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        metrics = jax.lax.pmean({"loss": loss, "accuracy": accuracy}, AXIS)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def make_predict_fn(model: models.ResNet, mesh: Mesh, mean: np.ndarray, std: np.ndarray) -> Callable:
    """jit(shard_map): (variables, uint8 images (B, 32, 32, 3)) -> float32 logits (B, K), eval mode."""

    def predict(variables, images):
        return model.apply(variables, data_lib.normalize(images, mean, std), train=False)

    return jax.jit(jax.shard_map(predict, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def predict(
    predict_fn: Callable, variables: Any, images: np.ndarray, batch_size: int, mesh: Mesh
) -> np.ndarray:
    """Logits (N, K) for every image exactly once, in fixed-size sharded batches.

    `batch_size` is rounded down to a multiple of the mesh's devices (at least one image each),
    which each batch is split over: a range test's `val_batch_size=500` on 8 TPU cores had failed.
    """
    devices = mesh.devices.size
    batch_size = max(devices, batch_size // devices * devices)
    labels = np.zeros(len(images), np.int32)
    outputs = []
    batches = data_lib.prefetch(
        data_lib.eval_batches(images, labels, batch_size),
        transfer=lambda b: (shard_batch(b.images, mesh), int(b.weights.sum())),
    )
    for sharded_images, count in batches:
        outputs.append((predict_fn(variables, sharded_images), count))
    return np.concatenate([np.asarray(out)[:count] for out, count in outputs]) if outputs else np.zeros((0, 0), np.float32)


def evaluate(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy, accuracy and the correct count of logits (N, K) against labels (N,)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) == 0 or np.shape(labels) != logits.shape[:1]:
        raise ValueError(f"evaluate takes logits (N, K) of at least one example and labels (N,), got shapes "
                         f"{logits.shape} and {np.shape(labels)}.")
    # A label of -1 would score the last class's log-probability without a word.
    labels, predictions = check_class_indices(labels, logits.argmax(-1), logits.shape[-1])
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    correct = int((predictions == labels).sum())
    return {"loss": float(loss), "accuracy": correct / len(labels), "correct": correct, "total": len(labels)}


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy per true class, float (K,); NaN for a class without examples; predictions, labels: (N,)."""
    labels, predictions = check_class_indices(labels, predictions, num_classes)
    totals = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / totals


# ----------------------------------------------------------------------------- run directory


def check_run_name(name: Any, what: str = "name") -> None:
    """ValueError unless `name` can start a run directory's name: a non-empty name, not a path."""
    if not isinstance(name, str) or not name.strip() or Path(name).name != name:
        raise ValueError(f"{what} starts the run directory's name, so it must be a non-empty name without "
                         f"'/', got {name!r}.")


def create_run_dir(workdir: str | os.PathLike, name: str) -> Path:
    """`<workdir>/<name>_<YYYYMMDD>_<HHMMSS>` (with a numeric suffix if that already exists)."""
    check_run_name(name)
    workdir = make_writable_folder(workdir, "workdir")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = workdir / f"{name}_{stamp}"
    suffix = 1
    while True:
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir = workdir / f"{name}_{stamp}_{suffix}"
            suffix += 1


_RUN_STAMP = re.compile(r"_(\d{8}_\d{6})(?:_(\d+))?$")


def _created(run_dir: Path) -> tuple[float, int]:
    """When a run directory was created: from the `<YYYYMMDD>_<HHMMSS>[_n]` of its name, which a
    copy keeps (`cp -r` gives every folder a new mtime, and --resume rewrites a config.json);
    from its config.json's mtime for a folder named otherwise."""
    match = _RUN_STAMP.search(run_dir.name)
    if match:
        with contextlib.suppress(ValueError):
            stamp = datetime.datetime.strptime(match[1], "%Y%m%d_%H%M%S").timestamp()
            return stamp, int(match[2] or 0)
    return (run_dir / "config.json").stat().st_mtime, 0


def latest_run_dir(workdir: str | os.PathLike) -> Path:
    """The most recently created run directory (one with a config.json) in `workdir`."""
    folder = Path(workdir)
    runs = sorted((p.parent for p in folder.glob("*/config.json")), key=_created)
    if not runs:
        hint = ""
        # `--workdir RUN_DIR --resume` is a natural slip, since explain.py's --workdir is the run.
        run = folder if _is_run(folder) else _run_around(folder)
        if run is not None:
            where = ("it is a run directory itself" if run == folder
                     else f"it lies inside the run directory {str(run)!r}")
            hint = f"; {where}: train.py --resume {shlex.quote(str(run))} continues it"
        raise FileNotFoundError(f"No run directory with a config.json in {str(workdir)!r} to resume{hint}.")
    return runs[-1]


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _run_around(path: str | os.PathLike) -> Path | None:
    """The run directory that `path` (a folder of a run: its checkpoints or its report) lies in, if any."""
    # The deepest folders of a run are checkpoints/<which>/<step>/<item>; looking no higher keeps a
    # stray config.json far above (a home folder's) from being named. The parents are those of the
    # absolute path because "." and ".." have none of their own; abspath folds ".." by name.
    return next(filter(_is_run, Path(os.path.abspath(path)).parents[:4]), None)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path if it is a run directory (it has a config.json); else ConfigError, naming
    the newest run inside it when the user passed the workdir that holds the runs, or the run around
    it when the user passed a folder inside one (its checkpoints or its report)."""
    run_dir = Path(run_dir)
    if _is_run(run_dir):
        return run_dir
    if not run_dir.exists():  # most often a mistyped path: "no config.json" would send the user looking for one
        raise ConfigError(f"The run directory {str(run_dir)!r} does not exist.")
    hint = ""
    if (around := _run_around(run_dir)) is not None:
        hint = f"; it lies inside the run directory {str(around)!r}, so pass that"
    elif run_dir.is_dir():
        with contextlib.suppress(FileNotFoundError):
            hint = f"; it holds run directories, so pass one, such as the newest {str(latest_run_dir(run_dir))!r}"
    raise ConfigError(f"{str(run_dir)!r} is not a jaxcam run directory (no config.json){hint}.")


def config_record(config: ml_collections.ConfigDict) -> dict:
    """What a run's config.json holds: the config, with the data paths made absolute so that
    explain.py and --resume find the data from any working directory."""
    saved = json.loads(config.to_json_best_effort())
    for key in DATA_KEYS:
        # From the config, not its JSON: a pathlib.Path there is "unserializable object: <path>".
        if config.get(key) is not None:
            saved[key] = str(Path(config[key]).expanduser().absolute())
    return saved


def check_trained_classes(run_dir: str | os.PathLike, meta: dict, dataset: data_lib.Cifar10, data: str,
                          remedy: str) -> None:
    """DataError unless `dataset` has the classes that a checkpoint's `meta` records as trained on
    (checkpoints written before they were recorded pass); `data` names the dataset, `remedy` the fix."""
    trained_on = meta.get("class_names")
    if trained_on is not None and list(trained_on) != list(dataset.class_names):
        raise data_lib.DataError(f"{str(run_dir)!r} was trained on the classes {', '.join(trained_on)}, but {data} "
                                 f"has {', '.join(dataset.class_names)}; {remedy}.")


def recorded_normalization(run_dir: str | os.PathLike, which: str,
                           meta: dict) -> tuple[tuple[str, ...], list, list] | None:
    """The class names, channel means and stds that training recorded in the meta of the `which`
    checkpoint of `run_dir`, checked (CheckpointError if malformed); None for a checkpoint
    written before they were recorded."""
    if not {"class_names", "mean", "std"} <= meta.keys():
        return None
    names, mean, std = meta["class_names"], meta["mean"], meta["std"]

    def three_numbers(values) -> bool:
        return isinstance(values, list) and len(values) == 3 and all(map(is_number, values))

    # JSON gives lists, never tuples, so the shared check's list-or-tuple is the list this meta needs.
    if not (class_names_problem(names) is None and len(names) >= 2
            and three_numbers(mean) and three_numbers(std) and min(std) > 0):
        raise CheckpointError(f"The classes and normalization recorded in the {which} checkpoint in {str(run_dir)!r} "
                              "are malformed (expected class names, 3 channel means and 3 positive standard "
                              "deviations); it was edited or damaged.")
    return tuple(names), mean, std


def check_trained_split(run_dir: str | os.PathLike, meta: dict, dataset: data_lib.Cifar10) -> None:
    """DataError unless `dataset`'s training split has the channel mean and std that the latest
    checkpoint's `meta` records (checkpoints written before they were recorded pass). They are
    exact sums of integers, so the same images in any order (tensorflow-datasets' or the official
    archive's) give them bitwise; other images, resumed on, would change the normalization and the
    steps per epoch, so the one-cycle schedule, half-way through a run."""
    recorded = recorded_normalization(run_dir, "latest", meta)
    if recorded is None:
        return
    _, mean, std = recorded
    if [float(v) for v in (*mean, *std)] != [float(v) for v in (*dataset.mean, *dataset.std)]:
        raise data_lib.DataError(
            f"{str(run_dir)!r} was trained on other training images than those of the data given (the channel mean "
            "and std recorded in its checkpoint differ from theirs); resume it on its own data.")


def record_data_location(config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> None:
    """Write where `config` finds the data (DATA_KEYS) into the run's config.json if it moved, so
    that explain.py and a later resume find it there too; the rest of the file stays as it is."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    saved, given = json.loads(path.read_text()), config_record(config)
    moved = {key: given.get(key) for key in DATA_KEYS if saved.get(key) != given.get(key)}
    if moved:
        write_json(path, {**saved, **moved})


# What may differ from a run's config.json when it is resumed: where the data lies, and settings
# that do not change what is trained.
RESUME_FREE_KEYS = (*DATA_KEYS, "name", "lr_finder", "prefetch", "tensorboard", "print_summary")


def check_resume_config(config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> None:
    """ConfigError unless `config` trains as `run_dir/config.json` does (RESUME_FREE_KEYS aside):
    resumed with other settings (more epochs, say), the run would silently be neither the one
    config.json records nor an uninterrupted run of the new settings."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    saved, given = config_record(config_from_json(path)), config_record(config)
    differing = [key for key in sorted(saved.keys() | given.keys())
                 if key not in RESUME_FREE_KEYS and saved.get(key) != given.get(key)]
    if differing:
        detail = ", ".join(f"{key} ({saved.get(key)!r} there, {given.get(key)!r} here)" for key in differing)
        raise ConfigError(f"The config differs from the run's {str(path)!r} in {detail}; a resumed run keeps its "
                          "own settings, so resume with configuration.config_from_json of that file.")


HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch records of `run_dir/history.json` ([] if there is none yet); ConfigError
    naming the file if it is not valid JSON or not a list of records with HISTORY_KEYS."""
    path = Path(run_dir) / "history.json"
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(history, list):
        raise ConfigError(f"{str(path)!r} must hold a list of per-epoch records, got {kind_of(history)}.")
    problem = history_problem(history, HISTORY_KEYS)
    if problem:
        raise ConfigError(f"{str(path)!r} is not a jaxcam history: {problem}.")
    return history


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    run_dir: Path
    test_logits: np.ndarray


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Cifar10:
    """The CIFAR-10 copy `config` names (`data_dir`, or tensorflow-datasets in `tfds_data_dir`)."""
    return data_lib.load_cifar10(config.data_dir, tfds_data_dir=config.get("tfds_data_dir"))


def train_epoch(
    train_step: Callable, state: TrainState, batches: Any, steps: int, description: str, progress: bool = True
) -> tuple[TrainState, dict[str, float]]:
    """Run `train_step` over `batches` (sharded (images, labels)) with a progress bar of the
    running loss and accuracy; returns the new state and the epoch's mean metrics, with
    `data_wait`: the seconds spent waiting for the next batch.

    Metrics are read two steps behind the newest dispatched step, so the host never stalls
    the device queue. Waiting for a batch is then the only way the input pipeline can hold
    the device up, so `data_wait` bounds the device's idle time for want of data (0 when the
    pipeline keeps ahead). Raises TrainingDiverged at the first non-finite loss.
    """
    bar = tqdm(total=steps, desc=description, disable=not progress, dynamic_ncols=True, leave=True, file=sys.stdout)
    pending: list[dict] = []
    totals = {"loss": 0.0, "accuracy": 0.0}
    done = 0

    def drain(keep: int) -> None:
        nonlocal done
        while len(pending) > keep:
            metrics = jax.device_get(pending.pop(0))
            if not np.isfinite(metrics["loss"]):
                raise TrainingDiverged(
                    f"The training loss became {float(metrics['loss'])} in {description.lower()} (step {done + 1})"
                )
            totals["loss"] += float(metrics["loss"])
            totals["accuracy"] += float(metrics["accuracy"])
            done += 1
            bar.update(1)
        if done:
            bar.set_postfix(loss=f"{totals['loss'] / done:.4f}", acc=f"{100 * totals['accuracy'] / done:.2f}%",
                            refresh=False)

    data_wait = 0.0
    batches = iter(batches)
    try:
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - started
            if batch is None:
                break
            state, metrics = train_step(state, *batch)
            pending.append(metrics)
            drain(keep=2)
        drain(keep=0)
    finally:
        bar.close()
    return state, {**{k: v / max(done, 1) for k, v in totals.items()}, "data_wait": data_wait}


# Keys whose value must lie in [0, 1], or in [0, 1) where a value of 1 means nothing
# (label smoothing 1 is a uniform target, momentum 1 never forgets).
_UNIT_CLOSED = ("cutout_prob", "pct_start")
_UNIT_HALF_OPEN = ("label_smoothing", "momentum", "base_momentum", "max_momentum", "beta2")
# Switches: a config file written from scratch can give one a string, and "False" or "no" is truthy.
_FLAG_KEYS = ("nesterov", "three_phase", "cycle_momentum", "augment", "flip", "tensorboard", "print_summary")
# Names looked up in a table: anything but a string would fail in .lower() with a traceback.
_NAME_KEYS = ("model", "optimizer", "dtype", "schedule", "anneal_strategy")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError with one clear sentence for missing or unknown keys, and for names and
    numbers that cannot work."""
    check_keys(config, CONFIG_KEYS, "The config", optional=("lr_finder",))
    check_run_name(config.name, "config.name")
    for key in _NAME_KEYS:
        if not isinstance(config[key], str):
            raise ValueError(f"config.{key} must be a name (a string), got {config[key]!r}.")
    for key in DATA_KEYS:
        if config[key] is not None and not is_path(config[key]):
            raise ValueError(f"config.{key} must be a path or None, got {config[key]!r}.")
    for key in _FLAG_KEYS:
        check_flag(config[key], f"config.{key}")
    models.check_model_name(config.model)
    if config.optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    resolve_dtype(config.dtype)
    if config.schedule not in ("onecycle", "constant"):
        raise ValueError(f"Unknown schedule {config.schedule!r}; choose 'onecycle' or 'constant'.")
    if config.anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"Unknown anneal_strategy {config.anneal_strategy!r}; choose 'cos' or 'linear'.")
    for key, least in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("width", 1), ("prefetch", 1),
                       ("crop_padding", 0), ("cutout_size", 0)):
        (check_positive_integer if least else check_non_negative_integer)(config[key], f"config.{key}")
    if not is_integer(config.seed, 0) or config.seed >= 2**63:
        # numpy refuses a negative seed only when the first epoch draws its shuffle.
        raise ValueError(f"config.seed must be an integer in 0..2**63 - 1, got {config.seed!r}.")
    if config.max_lr != "auto" and not (is_number(config.max_lr) and config.max_lr > 0):
        raise ValueError(f"config.max_lr must be a positive number or 'auto', got {config.max_lr!r}.")
    # Numbers out of range would train without complaint but mean nothing (a Cutout probability
    # of 2, a negative weight decay), so they stop here, before a run directory is made.
    for key in _UNIT_CLOSED + _UNIT_HALF_OPEN:
        value, closed = config[key], key in _UNIT_CLOSED
        if not is_number(value) or not (0 <= value <= 1 if closed else 0 <= value < 1):
            raise ValueError(f"config.{key} must lie in [0, 1{']' if closed else ')'}, got {value!r}.")
    if not is_number(config.weight_decay) or config.weight_decay < 0:
        raise ValueError(f"config.weight_decay must be zero or a positive number, got {config.weight_decay!r}.")
    for key in ("div_factor", "final_div_factor"):
        if not is_number(config[key]) or config[key] <= 0:
            raise ValueError(f"config.{key} must be a positive number, got {config[key]!r}.")


def check_batch_sizes(config: ml_collections.ConfigDict, dataset: data_lib.Cifar10,
                      num_devices: int | None = None) -> None:
    """ValueError unless both batch sizes split evenly over the `num_devices` (default: all local
    devices) and a training batch fits in the training split; the CLI checks this before it
    makes a run directory."""
    num_devices = num_devices if num_devices is not None else len(jax.local_devices())
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_devices:
            raise ValueError(f"config.{key} {config[key]} must be a multiple of the {num_devices} devices, "
                             "which share each batch.")
    if len(dataset.train_images) < config.batch_size:
        raise ValueError(
            f"config.batch_size {config.batch_size} is larger than the {len(dataset.train_images)} training images."
        )


def make_augment(config: ml_collections.ConfigDict, dataset: data_lib.Cifar10) -> Callable | None:
    """The config's augmentation as f(uint8 batch, rng), cutout filled with the dataset's mean; None if off."""
    if not config.augment:
        return None
    fill = tuple(int(round(v)) for v in dataset.mean * 255)

    def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return data_lib.augment_batch(images, rng, padding=config.crop_padding, cutout_size=config.cutout_size,
                                      cutout_prob=config.cutout_prob, fill=fill, flip=config.flip)

    return augment


def build(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
    """The model of `config` (name, width, compute dtype)."""
    dtype = DTYPES[resolve_dtype(config.dtype)]
    return models.create_model(config.model, num_classes=num_classes, width=config.width, dtype=dtype)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    dataset: data_lib.Cifar10 | None = None,
    devices: list | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `config` in `run_dir` (config.json, history.json, checkpoints/), evaluating each epoch.

    With `resume`, continue from the latest checkpoint in `run_dir`; the result equals an
    uninterrupted run with the same seed, and `config` must train as the run's config.json
    does (`check_resume_config`). Without it, a `run_dir` that already holds a run is refused
    (ConfigError) and left as it is. Raises TrainingDiverged if the loss turns NaN (the
    last good checkpoint and history stay as they were).
    """
    if not isinstance(config, ml_collections.ConfigDict):
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be an ml_collections.ConfigDict (as configs/default.py's get_config() "
                             f"returns) or a dict of its keys, got {kind_of(config)}.")
        # A plain dict (get_config().to_dict(), a config.json read with json) had failed at config.name.
        config = ml_collections.ConfigDict(config, type_safe=False)
    check_flag(resume, "resume")  # "no" would have resumed
    run_dir = Path(run_dir)
    if not resume and any((run_dir / name).exists() for name in ("config.json", "history.json")):
        # A notebook cell run twice: the second run would overwrite config.json, train, and then
        # fail at its first save on the checkpoint already there.
        raise ConfigError(f"{str(run_dir)!r} already holds a run; train in a new run directory "
                          "(train.create_run_dir), or continue this one with resume=True.")
    if resume:
        check_resume_config(config, run_dir)
    validate_config(config)
    _resolved_max_lr(config)  # before any data is read
    dataset = dataset if dataset is not None else load_dataset(config)
    mesh = make_mesh(devices)
    num_devices = mesh.devices.size
    check_batch_sizes(config, dataset, num_devices)
    mean, std = dataset.mean, dataset.std
    model = build(config, dataset.num_classes)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    tx, lr_schedule = create_optimizer(config, total_steps)
    state = create_train_state(model, jax.random.key(config.seed), tx)

    checkpointer = Checkpointer(run_dir)
    history: list[dict] = []
    start_epoch = 1
    history_path = run_dir / "history.json"
    if resume and checkpointer.latest_epoch() is None and not history_path.exists():
        # Stopped during the first epoch: starting over is what an uninterrupted run does.
        record_data_location(config, run_dir)
        log(f"{run_dir} stopped before its first epoch ended, so it starts again from epoch 1.")
    elif resume:
        state, meta = checkpointer.restore(state, "latest")
        try:  # with as many classes, training would go on silently with other labels, or other images
            check_trained_classes(run_dir, meta, dataset, "the data given", "resume it on its own data")
            check_trained_split(run_dir, meta, dataset)
        except data_lib.DataError:
            checkpointer.close()
            raise
        record_data_location(config, run_dir)  # only now: data refused above leaves config.json as it was
        start_epoch = int(meta["epoch"]) + 1
        history = [r for r in read_history(run_dir) if r["epoch"] < start_epoch]
        if start_epoch > config.epochs:
            # Return before building steps or opening a TensorBoard writer: a finished run stays untouched.
            log(f"{run_dir} already finished its {config.epochs} epoch{'s' if config.epochs != 1 else ''}; "
                "there is nothing to resume.")
            checkpointer.close()
            return TrainResult(state=state, history=history, run_dir=run_dir,
                               test_logits=np.zeros((0, dataset.num_classes), np.float32))
        log(f"Resuming {run_dir} after epoch {start_epoch - 1}.")
    else:
        write_json(run_dir / "config.json", config_record(config))
        log(models.summary(model) if config.get("print_summary", True) else f"{config.model} width {config.width}")
        device = jax.devices()[0]  # its kind says why "auto" chose what it did (a T4: float32)
        on = jax.default_backend() + (f", {device.device_kind}" if device.platform != "cpu" else "")
        log(f"Compute dtype: {jnp.dtype(model.dtype).name} (config.dtype={config.dtype!r}, {on}).")
    best_acc = max((r["test_acc"] for r in history), default=-1.0)

    train_step = make_train_step(model, mesh, mean, std, config.label_smoothing)
    predict_fn = make_predict_fn(model, mesh, mean, std)
    state = replicate(state, mesh)

    augment = make_augment(config, dataset)

    writer = _summary_writer(run_dir, config)
    test_logits = np.zeros((0, dataset.num_classes), np.float32)
    # Divergence is nearly always a learning rate too high for the model and batch.
    cause = f" (max_lr {config.max_lr:g} may be too high; train.py --find-lr suggests one)"
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            started = time.perf_counter()
            batches = data_lib.prefetch(
                data_lib.train_batches(
                    dataset.train_images, dataset.train_labels, config.batch_size,
                    seed=config.seed, epoch=epoch, augment=augment,
                ),
                transfer=lambda b: shard_batch((b.images, b.labels), mesh),
                size=config.prefetch,
            )
            kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else None
            try:
                state, train_metrics = train_epoch(train_step, state, batches, steps_per_epoch,
                                                   f"Epoch {epoch}/{config.epochs}", progress)
            except TrainingDiverged as diverged:
                kept = kept or "no epoch had finished, so there is no checkpoint to keep"
                raise TrainingDiverged(f"{diverged}; training stopped, and {kept}{cause}.") from None
            train_time = time.perf_counter() - started

            variables = {"params": state.params, "batch_stats": state.batch_stats}
            test_logits = predict(predict_fn, variables, dataset.test_images, config.eval_batch_size, mesh)
            if not np.isfinite(test_logits).all():
                # The losses are read before each update, so an update that blows the parameters up
                # in an epoch's last step passes the loss check; the test images catch it before
                # the blown-up parameters could be saved (their NaN accuracy counted class 0).
                raise TrainingDiverged(
                    f"The model's outputs on the test images became NaN or infinite after epoch "
                    f"{epoch}/{config.epochs}, so its checkpoint was not saved; training stopped, and "
                    f"{kept or 'there is no checkpoint to keep'}{cause}.")
            test = evaluate(test_logits, dataset.test_labels)
            record = {
                "epoch": epoch,
                "lr": float(lr_schedule(epoch * steps_per_epoch - 1)),
                "train_loss": train_metrics["loss"],
                "train_acc": train_metrics["accuracy"],
                "test_loss": test["loss"],
                "test_acc": test["accuracy"],
                "epoch_time": train_time,
                "data_wait": train_metrics["data_wait"],
            }
            history.append(record)
            log(
                f"Test set: Average loss: {test['loss']:.4f}, "
                f"Accuracy: {test['correct']}/{test['total']} ({100 * test['accuracy']:.2f}%)"
            )
            is_best = test["accuracy"] > best_acc
            best_acc = max(best_acc, test["accuracy"])
            # The compute dtype lets a report say when its float32 figures differ from these; the class
            # names let explain check that the data it loads is what the run was trained on; with the
            # normalization, a copy of the run classifies new images without the dataset at hand.
            with interrupts_deferred():
                checkpointer.save(epoch, state, {"test_acc": float(test["accuracy"]), "test_loss": float(test["loss"]),
                                                 "compute_dtype": jnp.dtype(model.dtype).name,
                                                 "class_names": list(dataset.class_names),
                                                 "mean": [float(v) for v in dataset.mean],
                                                 "std": [float(v) for v in dataset.std]}, is_best)
                write_json(run_dir / "history.json", history)
            if writer is not None:
                for key, value in record.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch)
                writer.flush()
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        if writer is not None and len(test_logits):
            _log_cam_gallery(writer, model, state, dataset, config.epochs)
    finally:
        checkpointer.wait()
        checkpointer.close()
        if writer is not None:
            writer.close()

    if len(test_logits):
        predictions = test_logits.argmax(-1)
        accuracies = per_class_accuracy(predictions, dataset.test_labels, dataset.num_classes)
        log("Per-class test accuracy:")
        for name, acc in zip(dataset.class_names, accuracies):
            # A class without test images has no accuracy; "nan%" had been printed for it.
            log(f"  {name:<12} {100 * acc:6.2f}%" if np.isfinite(acc) else f"  {name:<12} no test images")
    return TrainResult(state=state, history=history, run_dir=run_dir, test_logits=test_logits)


def _log_cam_gallery(writer, model: models.ResNet, state: TrainState, dataset: data_lib.Cifar10, step: int) -> None:
    """A Grad-CAM strip (first 8 test images over their layer3 maps) as a TensorBoard image."""
    from jaxcam import cam, viz

    images = dataset.test_images[:8]
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    maps = cam.compute(model, variables,
                       np.asarray(data_lib.normalize(images, dataset.mean, dataset.std)), layer="layer3")
    strip = np.concatenate([np.concatenate([img / 255.0, viz.overlay(img, m)], 0) for img, m in zip(images, maps)], 1)
    writer.add_image("gradcam/layer3", strip.astype(np.float32), step, dataformats="HWC")


def _summary_writer(run_dir: Path, config: ml_collections.ConfigDict):
    """A TensorBoard writer (tensorboardX, no TensorFlow needed) in `run_dir/tensorboard`, if enabled."""
    if not config.get("tensorboard", True):
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))

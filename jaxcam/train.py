"""Data-parallel training of CIFAR ResNets: optimizer, train/eval steps, the epoch loop.

The steps have pmap semantics, built with `jax.jit` over `jax.shard_map` on a one-axis
device `Mesh` named 'batch': each device holds a replica of the state and a slice of the
global batch; gradients, metrics and BatchNorm statistics are averaged with `lax.pmean`
over 'batch'. The same code runs on 1 CPU, 1 GPU, 8 TPU cores or the devices of several
processes (`jaxcam.distributed`), where each process builds its own rows of every batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
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
from jaxcam import distributed, models, rundir
from jaxcam._checks import (check_class_indices, check_flag, check_non_negative_integer,
                            check_positive_integer, is_integer, is_number, is_path)
from jaxcam.checkpoint import Checkpointer, has_finished_epoch, interrupts_deferred, write_json
from jaxcam.configuration import CONFIG_KEYS, DATA_KEYS, check_keys
from jaxcam.errors import ConfigError, TrainingDiverged
from jaxcam.schedules import onecycle

__all__ = [
    "TrainState", "TrainingDiverged", "onecycle", "create_optimizer", "create_train_state",
    "abstract_train_state", "compile_ahead", "make_mesh", "make_train_step", "make_predict_fn", "evaluate",
    "train_and_evaluate",
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


# ----------------------------------------------------------------------------- optimizer


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `config` with its one-cycle (or constant) schedule; returns (tx, lr_schedule).

    SGD (momentum, nesterov) and Adam apply weight decay as L2 on the gradient, like
    PyTorch's `weight_decay`; AdamW decays decoupled, like `torch.optim.AdamW`. With
    `cycle_momentum`, SGD momentum / Adam beta1 follows the one-cycle momentum schedule.
    """
    max_lr = float(config.max_lr)
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
    else:  # "constant"
        lr, momentum = optax.constant_schedule(max_lr), config.momentum
    return optimizer_with_schedule(config, lr, momentum), lr


def optimizer_with_schedule(
    config: ml_collections.ConfigDict, lr: float | optax.Schedule, momentum: float | optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by `config.optimizer` with the given learning rate and momentum/beta1."""
    name = config.optimizer.lower()
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

    A label outside 0..K-1 scores NaN, which stops training: one_hot would make it an all-zero
    target of loss 0. Adding 0 keeps the valid rows and their gradients exact.
    """
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    return loss + jnp.where((labels >= 0) & (labels < num_classes), 0.0, jnp.nan)


def create_train_state(
    model: models.ResNet, rng: jax.Array, tx: optax.GradientTransformation, mesh: Mesh | None = None
) -> TrainState:
    """A fresh TrainState: the model's initial parameters and BatchNorm statistics, `tx`'s state;
    replicated over `mesh` if given (made so on every process of a multi-process run)."""
    variables = models.init_variables(model, rng)  # one program per model, compiled once a process
    if mesh is not None and jax.process_count() > 1:
        variables = jax.device_get(variables)  # host arrays, the same on every process, enter a global jit
    # One small program: eagerly, the optimizer's zeros and its schedule's first value were some 25
    # single-operation XLA compilations, every run (too quick for the persistent cache to keep).
    create = functools.partial(_new_train_state, model, tx)
    return jax.jit(create, out_shardings=None if mesh is None else NamedSharding(mesh, P()))(variables)


def abstract_train_state(model: models.ResNet, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """What `create_train_state(model, rng, tx, mesh)` returns, as shapes, dtypes and shardings
    (jax.ShapeDtypeStruct leaves), without computing it: enough to compile the steps for it."""
    shapes = jax.eval_shape(lambda rng: _new_train_state(model, tx, models.init_variables(model, rng)),
                            jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated, weak_type=s.weak_type), shapes)


def _new_train_state(model: models.ResNet, tx: optax.GradientTransformation, variables: dict) -> TrainState:
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])


def _compiler() -> concurrent.futures.ThreadPoolExecutor | None:
    """Two workers for the train and eval steps (XLA releases the GIL while it compiles), on hosts
    of 4 cores or more. XLA:CPU's compiler already keeps about 1.6 of 2 cores busy, and on 2 cores
    programs compiled side by side only slowed each other (a smoke run took 1.3-1.5 s longer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxcam-compile") if cores >= 4 else None


_COMPILER = _compiler()


def compile_ahead(jitted: Callable, *args: Any) -> concurrent.futures.Future:
    """Compile `jitted` for arguments like `args` (arrays, or jax.ShapeDtypeStructs with their
    shardings): on a worker thread where the host has the cores for it, else at once. The Future
    gives the compiled program, which takes arguments of exactly those shapes, dtypes and
    shardings (it never compiles again)."""
    def compile_it():
        return jitted.lower(*args).compile()

    if _COMPILER is not None:
        return _COMPILER.submit(compile_it)
    compiled = concurrent.futures.Future()
    compiled.set_result(compile_it())
    return compiled


# ----------------------------------------------------------------------------- steps


def make_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh 'batch' over `devices` (default: the devices of every process, by process)."""
    devices = devices if devices is not None else distributed.global_devices()
    return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of `mesh` (one replica each)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split the leading axis of each array in `batch` over the mesh's devices; with several
    processes, `batch` is this process's rows of the global batch (`distributed.process_rows`)."""
    devices = len(mesh.local_devices)
    for array in jax.tree_util.tree_leaves(batch):
        if np.shape(array)[0] % devices:  # else JAX's IndivisibleError, in sharding terms
            raise ValueError(f"A batch of {np.shape(array)[0]} images does not split over the {devices} devices; "
                             f"give batches of a multiple of {devices}.")
    return distributed.global_batch(batch, mesh)


def make_train_step(
    model: models.ResNet,
    mesh: Mesh,
    mean: np.ndarray,
    std: np.ndarray,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """jit(shard_map(step)): (state, uint8 images (B, H, W, 3), labels (B,)) -> (state, metrics).

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
    """jit(shard_map): (variables, uint8 images (B, 32, 32, 3)) -> float32 logits (B, K), eval mode.

    The logits come out whole on every device (gathered in the same program), so that every
    process of a multi-process run reads all of them."""

    def predict(variables, images):
        return model.apply(variables, data_lib.normalize(images, mean, std), train=False)

    sharded = jax.shard_map(predict, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
    return jax.jit(sharded, out_shardings=NamedSharding(mesh, P()))


def predict(
    predict_fn: Callable, variables: Any, images: np.ndarray, batch_size: int, mesh: Mesh
) -> np.ndarray:
    """Logits (N, K) for every image exactly once, in fixed-size sharded batches.

    `batch_size` is rounded down to a multiple of the mesh's devices (at least one image each),
    which each batch is split over (a range test's `val_batch_size=500` on 8 TPU cores). With
    several processes, each puts its own rows of every batch on its devices.
    """
    devices = mesh.devices.size
    batch_size = max(devices, batch_size // devices * devices)
    rows = distributed.process_rows(batch_size, mesh)
    labels = np.zeros(len(images), np.int32)
    outputs = []
    batches = data_lib.prefetch(
        data_lib.eval_batches(images, labels, batch_size),
        transfer=lambda b: (shard_batch(b.images[rows], mesh), int(b.weights.sum())),
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


def validate_config(config: ml_collections.ConfigDict, find_lr: bool = False) -> None:
    """ConfigError with one clear sentence for missing or unknown keys, and for names and numbers
    that cannot work; with `find_lr`, also for `config.lr_finder`'s settings."""
    try:
        _check_config(config)
        if find_lr:
            from jaxcam import lr_finder  # it builds on this module

            lr_finder.validate_settings(config.get("lr_finder"))
    except ValueError as e:  # the shared predicates' errors, worded for the config
        raise ConfigError(str(e)) from None


def _check_config(config: ml_collections.ConfigDict) -> None:
    check_keys(config, CONFIG_KEYS, "The config", optional=("lr_finder",))
    rundir.check_run_name(config.name, "config.name")
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


def check_batch_sizes(config: ml_collections.ConfigDict, dataset: data_lib.Cifar10, num_devices: int) -> None:
    """ConfigError unless both batch sizes split evenly over `num_devices` and a training batch
    fits in the training split."""
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_devices:
            raise ConfigError(f"config.{key} {config[key]} must be a multiple of the {num_devices} devices, "
                              "which share each batch.")
    if len(dataset.train_images) < config.batch_size:
        raise ConfigError(
            f"config.batch_size {config.batch_size} is larger than the {len(dataset.train_images)} training images.")


def make_augment(config: ml_collections.ConfigDict, dataset: data_lib.Cifar10) -> Callable | None:
    """The config's augmentation as f(uint8 rows, rng, batch_size, first_row) (see `augment_batch`),
    Cutout filled with the dataset's mean; None if off."""
    if not config.augment:
        return None
    fill = tuple(int(round(v)) for v in dataset.mean * 255)

    def augment(images: np.ndarray, rng: np.random.Generator, batch_size: int, first_row: int) -> np.ndarray:
        return data_lib.augment_batch(images, rng, padding=config.crop_padding, cutout_size=config.cutout_size,
                                      cutout_prob=config.cutout_prob, fill=fill, flip=config.flip,
                                      batch_size=batch_size, first_row=first_row)

    return augment


def build(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
    """The model of `config` (name, width, compute dtype)."""
    dtype = DTYPES[resolve_dtype(config.dtype)]
    return models.create_model(config.model, num_classes=num_classes, width=config.width, dtype=dtype)


def prepare_run(
    config: ml_collections.ConfigDict | Mapping,
    run_dir: str | os.PathLike | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    resume: bool = False,
    find_lr: bool = False,
    dataset: data_lib.Cifar10 | None = None,
    devices: list | None = None,
    log: Callable[[str], None] = print,
) -> tuple[ml_collections.ConfigDict, data_lib.Cifar10, Mesh, Path]:
    """Check a run before anything is written: the config, the data (`dataset`, else the config's),
    the batch sizes on the mesh of `devices`; then make the run directory in `workdir` unless
    `run_dir` is given. Returns (config, dataset, mesh, run_dir)."""
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config), type_safe=False)  # a plain dict, or a read config.json
    if resume:
        rundir.check_resume_config(config, run_dir)
    elif run_dir is not None and any((Path(run_dir) / name).exists() for name in ("config.json", "history.json")):
        raise ConfigError(f"{str(run_dir)!r} already holds a run; train in a new run directory "
                          "(rundir.create_run_dir), or continue this one with resume=True.")
    validate_config(config, find_lr)
    if find_lr and distributed.process_count() > 1:
        raise ConfigError("The LR range test runs in one process: run train.py --find-lr-only on one host, then "
                          "train on all of them with --config.max_lr set to its suggestion.")
    if config.max_lr == "auto" and not find_lr:
        raise ConfigError("config.max_lr is 'auto': run the LR range test first (train.py --find-lr, or "
                          "find_lr=True in code).")
    dataset = dataset if dataset is not None else load_dataset(config)
    mesh = make_mesh(devices)
    check_batch_sizes(config, dataset, mesh.devices.size)
    if run_dir is None:
        # Decided once, by process 0, for every process to write into (a shared filesystem).
        run_dir = rundir.create_run_dir(workdir, config.name) if distributed.is_main_process() else ""
        run_dir = distributed.broadcast_path(run_dir)
        log(f"Run directory: {run_dir}")
    else:  # every process has checked that the run is new (or resumable) before process 0 writes to it
        distributed.barrier("jaxcam: run checked")
    return config, dataset, mesh, Path(run_dir)


def train_and_evaluate(
    config: ml_collections.ConfigDict | Mapping,
    run_dir: str | os.PathLike | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    resume: bool = False,
    find_lr: bool = False,
    dataset: data_lib.Cifar10 | None = None,
    devices: list | None = None,
    on_run_dir: Callable[[Path], None] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `config` in `run_dir` (or a new run directory in `workdir`), evaluating each epoch;
    writes config.json, history.json, checkpoints/ and tensorboard/ there.

    With `resume`, continue from the latest checkpoint in `run_dir`; the result equals an
    uninterrupted run with the same seed, and `config` must train as the run's config.json does.
    With `find_lr`, run the LR range test first, and train with its suggestion where
    `config.max_lr` is "auto". Raises TrainingDiverged if the loss turns NaN (the last good
    checkpoint and history stay as they were). `on_run_dir` is called with the run directory
    once it is known.

    With several processes (`jaxcam.distributed`), every process calls this with the same
    arguments; only process 0 prints and writes the run's files, and all of them save checkpoints.
    """
    if not distributed.is_main_process():
        log, progress = _silent, False
    config, dataset, mesh, run_dir = prepare_run(config, run_dir, workdir=workdir, resume=resume, find_lr=find_lr,
                                                 dataset=dataset, devices=devices, log=log)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    if find_lr:
        _resolve_max_lr(config, dataset, run_dir, log)
    model = build(config, dataset.num_classes)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    tx, lr_schedule = create_optimizer(config, config.epochs * steps_per_epoch)

    def epoch_loop() -> _EpochLoop:  # it compiles the steps
        return _EpochLoop(config, dataset, mesh, model, tx, lr_schedule, steps_per_epoch, progress)

    # The steps compile first (beside the state's making or restoring, on a host with the cores),
    # unless the run may be over; a stop meanwhile leaves nothing in a new run directory.
    loop = None if resume and has_finished_epoch(run_dir, config.epochs) else epoch_loop()
    state = create_train_state(model, jax.random.key(config.seed), tx, mesh)
    checkpointer = Checkpointer(run_dir)
    try:
        state, history = _begin_or_restore(config, run_dir, resume, checkpointer, state, model, dataset, log)
        if len(history) >= config.epochs:
            log(f"{run_dir} already finished its {config.epochs} epoch{'s' if config.epochs != 1 else ''}; "
                "there is nothing to resume.")
            return TrainResult(state, history, run_dir, np.zeros((0, dataset.num_classes), np.float32))
        loop = loop or epoch_loop()
        writer = _summary_writer(run_dir, config) if distributed.is_main_process() else None
        try:
            for epoch in range(len(history) + 1, config.epochs + 1):
                state, record, test = loop.run_epoch(state, epoch)
                history.append(record)
                log(f"Test set: Average loss: {test['loss']:.4f}, "
                    f"Accuracy: {test['correct']}/{test['total']} ({100 * test['accuracy']:.2f}%)")
                is_best = test["accuracy"] > max((r["test_acc"] for r in history[:-1]), default=-1.0)
                with interrupts_deferred():  # an epoch's checkpoint and its history record, both or neither
                    checkpointer.save(epoch, state, _checkpoint_meta(test, model, dataset, history), is_best)
                    if distributed.is_main_process():
                        write_json(run_dir / "history.json", history)
                _log_scalars(writer, record)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, record)
            if writer is not None:
                _log_cam_gallery(writer, model, state, dataset, config.epochs)
        finally:
            if writer is not None:
                writer.close()
    finally:
        checkpointer.close()
    _log_per_class_accuracy(loop.test_logits, dataset, log)
    return TrainResult(state, history, run_dir, loop.test_logits)


def _resolve_max_lr(config: ml_collections.ConfigDict, dataset: data_lib.Cifar10, run_dir: Path, log) -> None:
    """Run the LR range test into `run_dir`; where `config.max_lr` is "auto", set it to the suggestion."""
    from jaxcam import lr_finder  # it builds on this module

    suggestion = lr_finder.run_for_config(config, dataset, run_dir)
    if config.max_lr != "auto":
        log(f"Training with the config's max_lr {config.max_lr:.3g}; --config.max_lr=auto would train with the "
            "suggestion.")
    elif suggestion is None:
        raise TrainingDiverged("The LR range test gave no suggestion, so max_lr=auto cannot be resolved.")
    else:
        config.max_lr = float(suggestion)
        log(f"Training with the suggested max_lr {suggestion:.3g}.")


def _begin_or_restore(config, run_dir: Path, resume: bool, checkpointer: Checkpointer, state: TrainState,
                      model: models.ResNet, dataset: data_lib.Cifar10, log) -> tuple[TrainState, list[dict]]:
    """A new run writes its config.json; a resumed one restores its latest checkpoint, checked
    against the data given, and the history up to it. Returns (state, history)."""
    main = distributed.is_main_process()
    if not resume:
        if main:
            write_json(run_dir / "config.json", rundir.config_record(config))
        log(models.summary(model) if config.print_summary else f"{config.model} width {config.width}")
        device = jax.devices()[0]  # its kind says why "auto" chose what it did (a T4: float32)
        on = jax.default_backend() + (f", {device.device_kind}" if device.platform != "cpu" else "")
        log(f"Compute dtype: {jnp.dtype(model.dtype).name} (config.dtype={config.dtype!r}, {on}).")
        return state, []
    if checkpointer.latest_epoch() is None and not (run_dir / "history.json").exists():
        if main:
            rundir.record_data_location(config, run_dir)
        log(f"{run_dir} stopped before its first epoch ended, so it starts again from epoch 1.")
        return state, []
    state, meta = checkpointer.restore(state, "latest", log=log)
    rundir.check_trained_classes(run_dir, meta, dataset, "the data given", "resume it on its own data")
    rundir.check_trained_split(run_dir, meta, dataset)
    # The checkpoint's own history: history.json may be an epoch ahead of it (killed between the two
    # writes, or a torn latest checkpoint skipped) or behind it (killed before its rewrite).
    history = rundir.checkpoint_history(run_dir, meta)
    if main:
        rundir.record_data_location(config, run_dir)  # only now: data refused above leaves config.json as it was
        write_json(run_dir / "history.json", history)
    if len(history) < config.epochs:
        log(f"Resuming {run_dir} after epoch {meta['epoch']}.")
    return state, history


class _EpochLoop:
    """One epoch of training and evaluation, with what stays the same from epoch to epoch."""

    def __init__(self, config, dataset: data_lib.Cifar10, mesh: Mesh, model: models.ResNet,
                 tx: optax.GradientTransformation, lr_schedule: optax.Schedule, steps_per_epoch: int,
                 progress: bool):
        self.config, self.dataset, self.mesh, self.progress = config, dataset, mesh, progress
        self.lr_schedule, self.steps_per_epoch = jax.jit(lr_schedule), steps_per_epoch  # one program, not ten
        # Both steps compile now (`compile_ahead`), for the fixed shapes of every batch of the run.
        state = abstract_train_state(model, tx, mesh)
        split = NamedSharding(mesh, P(AXIS))
        image_shape = dataset.train_images.shape[1:]

        def images(batch_size: int) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8, sharding=split)

        self._train_step = compile_ahead(
            make_train_step(model, mesh, dataset.mean, dataset.std, config.label_smoothing), state,
            images(config.batch_size), jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=split))
        self._predict_fn = compile_ahead(make_predict_fn(model, mesh, dataset.mean, dataset.std),
                                         {"params": state.params, "batch_stats": state.batch_stats},
                                         images(config.eval_batch_size))
        self.augment = make_augment(config, dataset)
        self.rows = distributed.process_rows(config.batch_size, mesh)  # this process's share of each batch
        self.test_logits = np.zeros((0, dataset.num_classes), np.float32)
        # Divergence is nearly always a learning rate too high for the model and batch.
        self.cause = f" (max_lr {config.max_lr:g} may be too high; train.py --find-lr suggests one)"

    @property
    def train_step(self) -> Callable:
        return self._train_step.result()

    @property
    def predict_fn(self) -> Callable:
        return self._predict_fn.result()

    def run_epoch(self, state: TrainState, epoch: int) -> tuple[TrainState, dict, dict]:
        """Train epoch `epoch` and evaluate on the test split; returns (state, history record, test metrics)."""
        config, dataset = self.config, self.dataset
        started = time.perf_counter()
        batches = data_lib.prefetch(
            data_lib.train_batches(dataset.train_images, dataset.train_labels, config.batch_size,
                                   seed=config.seed, epoch=epoch, augment=self.augment, rows=self.rows),
            transfer=lambda b: shard_batch((b.images, b.labels), self.mesh), size=config.prefetch)
        kept = (f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1
                else "no epoch had finished, so there is no checkpoint to keep")
        try:
            state, metrics = train_epoch(self.train_step, state, batches, self.steps_per_epoch,
                                         f"Epoch {epoch}/{config.epochs}", self.progress)
        except TrainingDiverged as diverged:
            raise TrainingDiverged(f"{diverged}; training stopped, and {kept}{self.cause}.") from None
        train_time = time.perf_counter() - started
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits = predict(self.predict_fn, variables, dataset.test_images, config.eval_batch_size, self.mesh)
        if not np.isfinite(logits).all():
            # An update that blows the parameters up in an epoch's last step passes the loss check.
            raise TrainingDiverged(
                f"The model's outputs on the test images became NaN or infinite after epoch {epoch}/{config.epochs}, "
                f"so its checkpoint was not saved; training stopped, and {kept}{self.cause}.")
        self.test_logits = logits
        test = evaluate(logits, dataset.test_labels)
        record = {"epoch": epoch, "lr": float(self.lr_schedule(epoch * self.steps_per_epoch - 1)),
                  "train_loss": metrics["loss"], "train_acc": metrics["accuracy"], "test_loss": test["loss"],
                  "test_acc": test["accuracy"], "epoch_time": train_time, "data_wait": metrics["data_wait"]}
        return state, record, test


def _checkpoint_meta(test: dict, model: models.ResNet, dataset: data_lib.Cifar10, history: list[dict]) -> dict:
    """What a checkpoint records beside the state: its test metrics, the history up to it (which
    --resume restores with it), the compute dtype (a report says when its float32 figures differ),
    and the classes and normalization, with which a copy of the run classifies new images without
    the dataset."""
    return {"test_acc": float(test["accuracy"]), "test_loss": float(test["loss"]), "history": history,
            "compute_dtype": jnp.dtype(model.dtype).name, "class_names": list(dataset.class_names),
            "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std],
            "image_size": list(dataset.train_images.shape[1:3])}


def _silent(message: str) -> None:
    """The log of the processes other than process 0, which say nothing."""


def _log_per_class_accuracy(test_logits: np.ndarray, dataset: data_lib.Cifar10, log) -> None:
    """Print the last epoch's test accuracy per class (nothing when no epoch ran)."""
    if not len(test_logits):
        return
    accuracies = per_class_accuracy(test_logits.argmax(-1), dataset.test_labels, dataset.num_classes)
    log("Per-class test accuracy:")
    for name, acc in zip(dataset.class_names, accuracies):
        log(f"  {name:<12} {100 * acc:6.2f}%" if np.isfinite(acc) else f"  {name:<12} no test images")


def _log_scalars(writer, record: dict) -> None:
    if writer is not None:
        for key, value in record.items():
            if key != "epoch":
                writer.add_scalar(key, value, record["epoch"])
        writer.flush()


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
    if not config.tensorboard:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))

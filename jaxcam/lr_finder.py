"""LR range test with the semantics of pytorch-lr-finder's `range_test` and `plot(suggest_lr=True)`.

Train for `num_iter` steps while the learning rate sweeps from `start_lr` to `end_lr`
(exponentially by default); record the loss smoothed by an exponential moving average;
stop once the smoothed loss exceeds `diverge_th` times the best one. The suggestion is the
learning rate at the steepest descent (most negative `np.gradient`) of the smoothed loss
after dropping `skip_start` / `skip_end` points. The caller's model and optimizer state are
left untouched: the test runs on copies.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxcam import data as data_lib
from jaxcam import models
from jaxcam._checks import check_flag, check_non_negative_integer, is_integer, is_number, is_real
from jaxcam import train as train_lib
from jaxcam.checkpoint import write_json
from jaxcam.configuration import LR_FINDER_KEYS, check_keys


@dataclasses.dataclass
class RangeTestResult:
    """The learning rate of each step and its (smoothed) loss; `diverged` if stopped early."""

    lrs: list[float]
    losses: list[float]
    diverged: bool


def _check_sweep(start_lr: float, end_lr: float, num_iter: int, step_mode: str, prefix: str = "") -> None:
    """ValueError unless the sweep can run; `prefix` ("config.lr_finder.") names config keys."""
    if not is_integer(num_iter, 2):
        raise ValueError(f"{prefix}num_iter must be an integer of at least 2, got {num_iter!r}.")
    if not (is_number(start_lr) and is_number(end_lr) and 0 < start_lr < end_lr):
        raise ValueError(f"{prefix.rstrip('.') or 'The range test'} needs 0 < start_lr < end_lr, "
                         f"got {start_lr!r} and {end_lr!r}.")
    if step_mode not in ("exp", "linear"):
        raise ValueError(f"Unknown {prefix}step_mode {step_mode!r}; choose 'exp' or 'linear'.")


def _check_smoothing(smooth_f: float, diverge_th: float, prefix: str = "") -> None:
    """ValueError unless the loss can be smoothed and judged; `prefix` names config keys."""
    # As pytorch-lr-finder: smooth_f 1 would ignore every new loss, and diverge_th <= 1 would stop
    # at the first loss above the best one.
    if not (is_number(smooth_f) and 0 <= smooth_f < 1):
        raise ValueError(f"{prefix}smooth_f must lie in [0, 1), got {smooth_f!r}.")
    if not (is_real(diverge_th) and diverge_th > 1):  # infinity: never stop
        raise ValueError(f"{prefix}diverge_th must be greater than 1, got {diverge_th!r}.")


def _check_skips(skip_start: int, skip_end: int, prefix: str = "") -> None:
    """ValueError unless both are point counts to skip; `prefix` names config keys."""
    for key, value in (("skip_start", skip_start), ("skip_end", skip_end)):
        check_non_negative_integer(value, f"{prefix}{key}")


def _check_trim(skip_start: int, skip_end: int, up_to_minimum: bool, prefix: str = "") -> None:
    """ValueError unless the suggestion's trim can be applied; `prefix` names config keys."""
    _check_skips(skip_start, skip_end, prefix)
    check_flag(up_to_minimum, f"{prefix}up_to_minimum")


# A slope, so a suggestion, needs two points; a line on the plot too.
_MIN_POINTS = 2


def _points_after_skips(count: int, skip_start: int, skip_end: int) -> int:
    """How many of `count` points are left once `skip_start` and `skip_end` are dropped."""
    return max(count - skip_start - skip_end, 0)


def _check_one_loss_per_lr(lrs: list[float], losses: list[float]) -> None:
    if len(lrs) != len(losses):
        # The trim counts skip_end back from the end of lrs; with fewer losses (a stopped test's
        # losses beside the whole sweep) it would keep the last losses it should skip.
        raise ValueError(f"Give one loss per learning rate: {len(lrs)} learning rates but {len(losses)} losses "
                         "(a stopped test records fewer; pass its RangeTestResult's lrs and losses together).")


def lr_sequence(start_lr: float, end_lr: float, num_iter: int, step_mode: str = "exp") -> np.ndarray:
    """Learning rate of step i: exp `start * (end / start) ** (i / (n - 1))`, linear `start + (end - start) * i / (n - 1)`."""
    _check_sweep(start_lr, end_lr, num_iter, step_mode)
    r = np.arange(num_iter) / (num_iter - 1)
    if step_mode == "exp":
        return start_lr * (end_lr / start_lr) ** r
    return start_lr + r * (end_lr - start_lr)


def smooth_and_stop(losses: Iterable[float], smooth_f: float = 0.05, diverge_th: float = 5.0) -> tuple[list[float], bool]:
    """pytorch-lr-finder's bookkeeping: EMA-smoothed losses, cut after the first divergent one.

    s_0 = l_0; s_i = smooth_f * l_i + (1 - smooth_f) * s_{i-1}; stop (keeping s_i) when
    s_i > diverge_th * min(s_0..s_i). Returns (smoothed losses, diverged).
    """
    _check_smoothing(smooth_f, diverge_th)
    return _smooth_and_stop(losses, smooth_f, diverge_th)


def _smooth_and_stop(losses: Iterable[float], smooth_f: float, diverge_th: float) -> tuple[list[float], bool]:
    """`smooth_and_stop` for settings already checked (range_test checks them once, not every step)."""
    history: list[float] = []
    best = None
    for i, loss in enumerate(losses):
        loss = float(loss)
        if i > 0 and smooth_f > 0:
            loss = smooth_f * loss + (1 - smooth_f) * history[-1]
        best = loss if best is None else min(best, loss)
        history.append(loss)
        if not np.isfinite(loss) or loss > diverge_th * best:
            return history, True
    return history, False


def suggest_lr(
    lrs: list[float], losses: list[float], skip_start: int = 10, skip_end: int = 5, *, up_to_minimum: bool = True
) -> tuple[int, float]:
    """(index into `lrs`, lr) of the steepest loss descent after trimming; ValueError if too few points.

    pytorch-lr-finder takes the most negative `np.gradient` over all trimmed points
    (`up_to_minimum=False`). A BatchNorm network with weight decay often survives a loss spike
    at high learning rates and descends again without ever reaching `diverge_th`; that
    rule then suggests a rate on the far side of the spike. With `up_to_minimum` (default)
    only the points up to the lowest smoothed loss count: the valley before divergence. On a
    curve whose minimum comes last, as when the test stops at divergence, both agree.
    """
    _check_trim(skip_start, skip_end, up_to_minimum)
    _check_one_loss_per_lr(lrs, losses)
    end = len(lrs) - skip_end
    trimmed = np.asarray(losses[skip_start:end], np.float64)
    # A test stopped by a NaN or infinite loss keeps that point last; np.gradient next to it is NaN,
    # and argmin would pick the NaN.
    finite = np.isfinite(trimmed)
    if not finite.all():
        trimmed = trimmed[: int(np.argmin(finite))]
    if up_to_minimum and len(trimmed):
        trimmed = trimmed[: int(np.argmin(trimmed)) + 1]
    if len(trimmed) < _MIN_POINTS:
        raise ValueError(
            f"Too few points for a suggestion: {len(lrs)} recorded, {len(trimmed)} usable after skipping "
            f"{skip_start} at the start and {skip_end} at the end"
            f"{' and cutting at the loss minimum' if up_to_minimum else ''}; run more iterations or skip fewer."
        )
    index = int(np.gradient(trimmed).argmin())
    return skip_start + index, float(lrs[skip_start + index])


def range_test(
    model: Any,
    variables: dict,
    make_optimizer: Callable[[optax.Schedule], optax.GradientTransformation],
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    *,
    mean: np.ndarray,
    std: np.ndarray,
    start_lr: float = 1e-5,
    end_lr: float = 10.0,
    num_iter: int = 100,
    step_mode: str = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    label_smoothing: float = 0.0,
    val_data: tuple[np.ndarray, np.ndarray] | None = None,
    val_batch_size: int = 500,
    opt_state: Any = None,
    mesh: Any = None,
    progress: bool = True,
) -> RangeTestResult:
    """Run the range test from `variables` ({'params', 'batch_stats'}) with BatchNorm in training mode.

    `make_optimizer(schedule)` builds the optimizer with the given lr schedule (the test's
    sweep); `opt_state`, if given, is its starting state (e.g. the momentum buffers of a
    TrainState whose optimizer has the same structure), else a fresh one. Neither
    `variables` nor `opt_state` is modified. `batches` yields uint8 images (B, 32, 32, 3)
    and labels (B,). With `val_data`
    (images, labels) the recorded loss is the validation loss after each step (slower, as in
    pytorch-lr-finder's `val_loader` mode). Runs data-parallel over `mesh` (all local devices).
    """
    models.check_variables(model, variables)  # a ResNet's; other modules are taken as they are
    _check_smoothing(smooth_f, diverge_th)  # before the step compiles, not after the first step
    lrs = lr_sequence(start_lr, end_lr, num_iter, step_mode)
    schedule = lambda count: jnp.asarray(lrs, jnp.float32)[jnp.minimum(count, num_iter - 1)]
    tx = make_optimizer(schedule)
    mesh = mesh if mesh is not None else train_lib.make_mesh()
    # Copies, because the train step donates its state buffers: the caller's arrays stay valid.
    copy = lambda tree: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)
    copied = copy(variables)
    state = train_lib.TrainState.create(apply_fn=model.apply, params=copied["params"], tx=tx,
                                        batch_stats=copied["batch_stats"])
    if opt_state is not None:
        expected = jax.tree_util.tree_structure(state.opt_state)
        if jax.tree_util.tree_structure(opt_state) != expected:
            raise ValueError("opt_state does not have the structure of the range test's optimizer.")
        state = state.replace(opt_state=copy(opt_state))
    state = train_lib.replicate(state, mesh)
    step = train_lib.make_train_step(model, mesh, mean, std, label_smoothing)
    predict_fn = train_lib.make_predict_fn(model, mesh, mean, std) if val_data is not None else None

    raw: list[float] = []
    smoothed: list[float] = []
    diverged = False
    # The bar closes however the loop ends: a batch that does not split over the devices raises.
    with tqdm(total=num_iter, desc="LR range test", disable=not progress) as bar:
        for i, (images, labels) in enumerate(itertools.islice(batches, num_iter)):
            state, metrics = step(state, *train_lib.shard_batch((images, labels), mesh))
            if val_data is not None:
                logits = train_lib.predict(predict_fn, {"params": state.params, "batch_stats": state.batch_stats},
                                           val_data[0], val_batch_size, mesh)
                loss = train_lib.evaluate(logits, val_data[1])["loss"]
            else:
                loss = float(metrics["loss"])
            raw.append(loss)
            smoothed, diverged = _smooth_and_stop(raw, smooth_f, diverge_th)
            bar.update(1)
            bar.set_postfix(lr=f"{lrs[i]:.2e}", loss=f"{smoothed[-1]:.4f}", refresh=False)
            if diverged:
                break
    return RangeTestResult(lrs=[float(v) for v in lrs[: len(smoothed)]], losses=smoothed, diverged=diverged)


def plot(result: RangeTestResult, path: str | Path, *, skip_start: int = 10, skip_end: int = 5,
         suggestion: tuple[int, float] | None = None) -> None:
    """Loss against learning rate (log axis) with the suggestion marked; saved as PNG.

    `suggestion` is (index into result.lrs, lr), as `suggest_lr` returns it.
    """
    from jaxcam import viz  # matplotlib loads only when a plot is drawn

    _check_skips(skip_start, skip_end)
    _check_one_loss_per_lr(result.lrs, result.losses)
    count = len(result.lrs)
    end = count - skip_end
    lrs, losses = result.lrs[skip_start:end], result.losses[skip_start:end]
    if not lrs:
        raise ValueError(f"Nothing to plot: {count} points recorded, none left after skipping {skip_start} at the "
                         f"start and {skip_end} at the end; skip fewer.")
    if suggestion is not None and not (isinstance(suggestion, (tuple, list)) and len(suggestion) == 2
                                       and is_integer(suggestion[0], 0) and suggestion[0] < count
                                       and is_number(suggestion[1])):
        raise ValueError(f"suggestion must be (index, lr) as suggest_lr returns, with an index of one of the {count} "
                         f"points, got {suggestion!r}.")
    fig, ax = viz.subplots(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    ax.plot(lrs, losses, color="#1f77b4", lw=1.8)
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel("Smoothed training loss")
    title = "LR range test"
    if suggestion is not None:
        index, lr = suggestion
        ax.scatter([lr], [result.losses[index]], s=90, marker="o", color="#d62728", zorder=3,
                   label=f"steepest descent: {lr:.2e}")
        ax.legend(loc="upper left")
        title += f" (suggested max LR {lr:.2e})"
    else:
        title += " (no suggestion)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path)


def json_record(result: RangeTestResult, suggestion: tuple[int, float] | None) -> dict[str, Any]:
    """What `lr_finder.json` holds. A NaN or infinite loss (the one that stopped the test) is
    written as null: JSON has no NaN, and strict readers (browsers, jq) refuse Python's token."""
    return {
        "lrs": result.lrs, "losses": [loss if np.isfinite(loss) else None for loss in result.losses],
        "diverged": result.diverged,
        "suggested_lr": suggestion[1] if suggestion else None, "suggested_index": suggestion[0] if suggestion else None,
    }


def validate_settings(settings: Any) -> None:
    """Raise ValueError with one sentence if `config.lr_finder` cannot run; checked before a run
    directory is made, so a typo leaves nothing behind. `settings` is None where the config has
    no `lr_finder`."""
    if settings is None:
        raise ValueError("The config has no lr_finder settings for the LR range test; copy them from "
                         "configs/default.py.")
    check_keys(settings, LR_FINDER_KEYS, "config.lr_finder")
    _check_sweep(settings.start_lr, settings.end_lr, settings.num_iter, settings.step_mode, "config.lr_finder.")
    _check_trim(settings.skip_start, settings.skip_end, settings.up_to_minimum, "config.lr_finder.")
    # Even a sweep that runs to its end would leave no slope to suggest from, and nothing to plot:
    # the whole test would run first and then fail.
    left = _points_after_skips(settings.num_iter, settings.skip_start, settings.skip_end)
    if left < _MIN_POINTS:
        raise ValueError(f"config.lr_finder skips {settings.skip_start} + {settings.skip_end} of its "
                         f"{settings.num_iter} points, leaving {left}; a suggestion needs {_MIN_POINTS}, so skip "
                         "fewer or raise num_iter.")
    _check_smoothing(settings.smooth_f, settings.diverge_th, "config.lr_finder.")


def run_for_config(config: Any, dataset: data_lib.Cifar10, run_dir: str | Path, *, progress: bool = True) -> float | None:
    """The range test of `config.lr_finder` on the config's model; writes `lr_finder.png` and
    `lr_finder.json` in `run_dir`, prints and returns the suggested LR (None if too few points)."""
    run_dir = Path(run_dir)
    settings = config.lr_finder
    model = train_lib.build(config, dataset.num_classes)
    variables = models.init_variables(model, jax.random.key(config.seed))

    def make_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
        # The training optimizer with the sweep as its lr and a constant momentum, as
        # pytorch-lr-finder runs the user's optimizer.
        return train_lib.optimizer_with_schedule(config, schedule, config.momentum)

    augment = train_lib.make_augment(config, dataset)

    def epochs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Its own seed, so the range test does not replay the training run's first batches.
        for epoch in itertools.count(1):
            for batch in data_lib.train_batches(dataset.train_images, dataset.train_labels, config.batch_size,
                                                seed=config.seed + 7919, epoch=epoch, augment=augment):
                yield batch.images, batch.labels

    result = range_test(
        model, variables, make_optimizer, epochs(), mean=dataset.mean, std=dataset.std,
        start_lr=settings.start_lr, end_lr=settings.end_lr, num_iter=settings.num_iter, step_mode=settings.step_mode,
        smooth_f=settings.smooth_f, diverge_th=settings.diverge_th, label_smoothing=config.label_smoothing,
        progress=progress,
    )
    try:
        suggestion = suggest_lr(result.lrs, result.losses, settings.skip_start, settings.skip_end,
                                up_to_minimum=settings.get("up_to_minimum", True))
        print(f"LR range test: suggested max LR {suggestion[1]:.3g} (steepest descent of the smoothed loss).")
    except ValueError as e:
        suggestion = None
        # validate_settings leaves enough points for a whole sweep, so a diverged test is short
        # because its sweep started too high; "skip fewer" would not help it.
        reason = (f"The loss diverged after {len(result.lrs)} of {settings.num_iter} steps, at lr "
                  f"{result.lrs[-1]:.3g}, with too few points before it for a suggestion; start the sweep lower "
                  "(config.lr_finder.start_lr)." if result.diverged else str(e))
        print(f"LR range test: no suggestion. {reason}")
    write_json(run_dir / "lr_finder.json", json_record(result, suggestion))
    # A test that diverged within the points to skip has nothing left after the trim: plot all
    # it recorded rather than fail (and, with --find-lr, never train).
    kept = _points_after_skips(len(result.lrs), settings.skip_start, settings.skip_end)
    skips = (settings.skip_start, settings.skip_end) if kept >= _MIN_POINTS else (0, 0)
    plot(result, run_dir / "lr_finder.png", skip_start=skips[0], skip_end=skips[1], suggestion=suggestion)
    return suggestion[1] if suggestion else None

"""The one-cycle policy of `torch.optim.lr_scheduler.OneCycleLR`, as optax schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxcam._checks import check_flag, check_positive_integer, is_number


def _interpolate(strategy: str):
    """f(start, end, done, left) with done + left = span, in a form without cancellation.

    PyTorch's cos form `end + (start - end) / 2 * (1 + cos(pi * pct))` equals
    `start * cos^2(pi * pct / 2) + end * sin^2(pi * pct / 2)`; writing the cosine as
    `sin(pi / 2 * left / span)` keeps float32 within 1e-6 relative of the exact value even
    at the last steps, where `cos(pi * pct / 2)` of a rounded pct would be off by 1e-4.
    """
    if strategy == "cos":
        return lambda start, end, done, left, span: (
            start * jnp.square(jnp.sin(jnp.pi / 2 * left / span))
            + end * jnp.square(jnp.sin(jnp.pi / 2 * done / span))
        )
    if strategy == "linear":
        return lambda start, end, done, left, span: start * (left / span) + end * (done / span)
    raise ValueError(f"Unknown anneal_strategy {strategy!r}; choose 'cos' or 'linear'.")


def onecycle(
    total_steps: int,
    max_lr: float,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[optax.Schedule, optax.Schedule]:
    """(lr_schedule, momentum_schedule) equal to OneCycleLR's values for the k-th optimizer step.

    Step k = 0 is the first update (PyTorch sets the initial lr `max_lr / div_factor` at
    construction and calls `scheduler.step()` after each `optimizer.step()`). Phases, as in
    PyTorch: warm-up to `max_lr` ending at step `pct_start * total_steps - 1`, then (with
    `three_phase`) back down to the initial lr at `2 * pct_start * total_steps - 2`, then
    annealing to `initial_lr / final_div_factor` at `total_steps - 1`. Momentum (or Adam's
    beta1) moves inversely between `max_momentum` and `base_momentum`. Steps past the end
    hold the final values (PyTorch would raise).
    """
    check_positive_integer(total_steps, "total_steps")
    if not (is_number(pct_start) and 0 <= pct_start <= 1):
        raise ValueError(f"pct_start must lie in [0, 1], got {pct_start!r}.")
    # As OneCycleLR: a negative or zero rate would silently train backwards or not at all.
    for name, value in (("max_lr", max_lr), ("div_factor", div_factor), ("final_div_factor", final_div_factor)):
        if not (is_number(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    for name, value in (("base_momentum", base_momentum), ("max_momentum", max_momentum)):
        if not is_number(value):  # OneCycleLR sets no range; a string or NaN would pass into every step
            raise ValueError(f"{name} must be a number, got {value!r}.")
    check_flag(three_phase, "three_phase")
    interpolate = _interpolate(anneal_strategy)
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warm_end = float(pct_start * total_steps) - 1
    if three_phase:
        phases = [
            (warm_end, (initial_lr, max_lr), (max_momentum, base_momentum)),
            (float(2 * pct_start * total_steps) - 2, (max_lr, initial_lr), (base_momentum, max_momentum)),
            (total_steps - 1.0, (initial_lr, min_lr), (max_momentum, max_momentum)),
        ]
    else:
        phases = [
            (warm_end, (initial_lr, max_lr), (max_momentum, base_momentum)),
            (total_steps - 1.0, (max_lr, min_lr), (base_momentum, max_momentum)),
        ]

    def make(index: int) -> optax.Schedule:
        def schedule(step):
            step = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps - 1.0)
            value = jnp.float32(0.0)
            chosen = jnp.bool_(False)
            start_step = 0.0
            for i, (end_step, lrs, moms) in enumerate(phases):
                start, end = (lrs, moms)[index]
                span = end_step - start_step
                if span == 0:  # a phase of one step sits at its start value (PyTorch divides by 0)
                    here = jnp.float32(start)
                else:
                    here = interpolate(
                        jnp.float32(start), jnp.float32(end), step - start_step, end_step - step, jnp.float32(span)
                    )
                # PyTorch uses the first phase whose end is >= step, else the last one.
                take = ~chosen & ((step <= end_step) | (i == len(phases) - 1))
                value = jnp.where(take, here, value)
                chosen = chosen | take
                start_step = end_step
            return value

        return schedule

    return make(0), make(1)

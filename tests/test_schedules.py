import math

import jax
import numpy as np
import pytest

from jaxcam.train import onecycle

CASES = [
    dict(total_steps=1000, max_lr=0.1),
    dict(total_steps=97, max_lr=0.05, pct_start=0.25, anneal_strategy="linear"),
    dict(total_steps=2000, max_lr=1.0, div_factor=10.0, final_div_factor=1e5, three_phase=True),
    dict(total_steps=391 * 20, max_lr=0.4, pct_start=0.2, base_momentum=0.8, max_momentum=0.9),
    dict(total_steps=50, max_lr=3e-3, pct_start=0.5, anneal_strategy="linear", three_phase=True),
]


def reference_onecycle(total_steps, max_lr, pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                       anneal_strategy="cos", three_phase=False, base_momentum=0.85, max_momentum=0.95):
    """OneCycleLR's published formula (torch/optim/lr_scheduler.py), in float64."""
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    if anneal_strategy == "cos":
        anneal = lambda start, end, pct: end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    else:
        anneal = lambda start, end, pct: (end - start) * pct + start
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, initial_lr, max_lr, max_momentum, base_momentum),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr, base_momentum, max_momentum),
            (total_steps - 1, initial_lr, min_lr, max_momentum, max_momentum),
        ]
    else:
        phases = [
            (float(pct_start * total_steps) - 1, initial_lr, max_lr, max_momentum, base_momentum),
            (total_steps - 1, max_lr, min_lr, base_momentum, max_momentum),
        ]
    lrs, moms = [], []
    for step in range(total_steps):
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                pct = (step - start_step) / (end_step - start_step)
                lrs.append(anneal(lr0, lr1, pct))
                moms.append(anneal(m0, m1, pct))
                break
            start_step = end_step
    return np.array(lrs), np.array(moms)


@pytest.mark.parametrize("kwargs", CASES)
def test_onecycle_matches_the_published_formula(kwargs):
    kwargs = dict(kwargs)
    total, max_lr = kwargs.pop("total_steps"), kwargs.pop("max_lr")
    expected_lr, expected_mom = reference_onecycle(total, max_lr, **kwargs)
    lr_schedule, momentum_schedule = onecycle(total, max_lr, **kwargs)
    steps = np.arange(total)
    lr = np.asarray(jax.jit(jax.vmap(lr_schedule))(steps), np.float64)
    mom = np.asarray(jax.jit(jax.vmap(momentum_schedule))(steps), np.float64)
    assert lr.dtype == np.float64 and np.asarray(lr_schedule(0)).dtype == np.float32
    assert np.max(np.abs(lr - expected_lr) / expected_lr) < 1e-5
    assert np.max(np.abs(mom - expected_mom) / expected_mom) < 1e-5
    assert lr[0] == pytest.approx(max_lr / kwargs.get("div_factor", 25.0), rel=1e-6)


@pytest.mark.parametrize("kwargs", CASES[:3])
def test_onecycle_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    kwargs = dict(kwargs)
    total, max_lr = kwargs.pop("total_steps"), kwargs.pop("max_lr")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, **kwargs)
    lrs, moms = [], []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        moms.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    lr_schedule, momentum_schedule = onecycle(total, max_lr, **kwargs)
    steps = np.arange(total)
    np.testing.assert_allclose(jax.vmap(lr_schedule)(steps), lrs, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(momentum_schedule)(steps), moms, rtol=1e-5)


def test_onecycle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="anneal_strategy"):
        onecycle(10, 0.1, anneal_strategy="cosine")
    with pytest.raises(ValueError, match="total_steps must be a positive integer, got 0."):
        onecycle(0, 0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive integer, got 10.5."):
        onecycle(10.5, 0.1)  # would have stretched the phases over fractional steps
    with pytest.raises(ValueError, match="max_lr must be a positive number, got -0.1."):
        onecycle(10, -0.1)  # would have trained with negative learning rates
    with pytest.raises(ValueError, match="final_div_factor must be a positive number, got 0."):
        onecycle(10, 0.1, final_div_factor=0)
    with pytest.raises(ValueError, match=r"pct_start must lie in \[0, 1\], got '0.3'."):
        onecycle(10, 0.1, pct_start="0.3")
    # Strings and NaN momenta went into the schedule unchecked: "0.9" cycled as a number would.
    with pytest.raises(ValueError, match="max_momentum must be a number, got '0.9'."):
        onecycle(10, 0.1, max_momentum="0.9")
    with pytest.raises(ValueError, match="base_momentum must be a number, got nan."):
        onecycle(10, 0.1, base_momentum=float("nan"))
    # A non-empty string is truthy: "no" would have given three phases.
    with pytest.raises(ValueError, match="three_phase must be True or False, got 'no'."):
        onecycle(10, 0.1, three_phase="no")

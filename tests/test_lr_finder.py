import json
import re

import jax
import numpy as np
import optax
import pytest

import train as train_cli
from conftest import ROOT, cli_command, once_present, sigterm_once
from jaxcam import data as data_lib, lr_finder, models, train as train_lib
from jaxcam.configuration import load_config_file


def test_lr_sequence_formulas():
    exp = lr_finder.lr_sequence(1e-5, 10.0, 7, "exp")
    np.testing.assert_allclose(exp, [1e-5 * (10.0 / 1e-5) ** (i / 6) for i in range(7)], rtol=1e-12)
    lin = lr_finder.lr_sequence(0.1, 1.0, 4, "linear")
    np.testing.assert_allclose(lin, [0.1, 0.4, 0.7, 1.0])
    with pytest.raises(ValueError, match="step_mode"):
        lr_finder.lr_sequence(1e-5, 1.0, 5, "cos")
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        lr_finder.lr_sequence(1.0, 0.1, 5)


@pytest.mark.parametrize("start_lr, end_lr", [(1e-5, float("inf")), ("1e-5", 10.0), (float("nan"), 10.0)])
def test_lr_sequence_needs_finite_numbers(start_lr, end_lr):
    with pytest.raises(ValueError, match=re.escape(f"The range test needs 0 < start_lr < end_lr, got {start_lr!r} "
                                                   f"and {end_lr!r}.")):
        lr_finder.lr_sequence(start_lr, end_lr, 5)


@pytest.mark.parametrize("key, value, message", [
    ("up_to_minimum", "no", "config.lr_finder.up_to_minimum must be True or False, got 'no'."),
    ("skip_end", 1.5, "config.lr_finder.skip_end must be a non-negative integer, got 1.5."),
    ("end_lr", float("inf"), "config.lr_finder needs 0 < start_lr < end_lr, got 1e-05 and inf."),
])
def test_range_test_settings_of_a_config_file_are_checked(key, value, message):
    config = load_config_file(ROOT / "configs" / "default.py")
    config.lr_finder[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        lr_finder.validate_settings(config.lr_finder)


@pytest.mark.parametrize("settings, message", [
    ({"skip_start": 2.5}, "skip_start must be a non-negative integer, got 2.5."),
    ({"skip_end": True}, "skip_end must be a non-negative integer, got True."),
    ({"skip_start": "1"}, "skip_start must be a non-negative integer, got '1'."),
    ({"skip_end": -1}, "skip_end must be a non-negative integer, got -1."),
    ({"up_to_minimum": "no"}, "up_to_minimum must be True or False, got 'no'."),
])
def test_suggestion_checks_its_trim(settings, message):
    lrs, losses = list(np.geomspace(1e-4, 1, 30)), list(np.linspace(3, 1, 30))
    with pytest.raises(ValueError, match=re.escape(message)):
        lr_finder.suggest_lr(lrs, losses, **settings)


def test_smoothing_matches_the_ema_formula():
    losses = [2.0, 1.0, 3.0, 0.5]
    smoothed, diverged = lr_finder.smooth_and_stop(losses, smooth_f=0.1, diverge_th=100)
    expected = [2.0]
    for loss in losses[1:]:
        expected.append(0.1 * loss + 0.9 * expected[-1])
    np.testing.assert_allclose(smoothed, expected)
    assert not diverged


def test_divergence_stops_after_the_first_divergent_point():
    losses = [1.0, 0.8, 0.6, 0.5, 2.6, 9.0, 9.0]
    smoothed, diverged = lr_finder.smooth_and_stop(losses, smooth_f=0.0, diverge_th=5.0)
    assert diverged and smoothed == [1.0, 0.8, 0.6, 0.5, 2.6]  # 2.6 > 5 * 0.5 stops, kept as in pytorch-lr-finder
    assert lr_finder.smooth_and_stop([1.0, float("nan")], 0.0)[1]
    assert not lr_finder.smooth_and_stop([1.0, 0.1, 1e6], 0.0, diverge_th=float("inf"))[1]  # never stop


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(smooth_f=1.5), r"smooth_f must lie in \[0, 1\), got 1.5."),
        (dict(smooth_f=float("nan")), r"smooth_f must lie in \[0, 1\), got nan."),
        (dict(diverge_th=1.0), "diverge_th must be greater than 1, got 1.0."),
        (dict(diverge_th="5"), "diverge_th must be greater than 1, got '5'."),
    ],
)
def test_smoothing_rejects_settings_that_pytorch_lr_finder_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_finder.smooth_and_stop([1.0, 2.0], **kwargs)


def test_suggestion_is_the_steepest_descent():
    lrs = list(np.logspace(-5, 1, 40))
    losses = [2.3] * 40
    for i in range(15, 25):
        losses[i] = 2.3 - 0.05 * (i - 14)
    losses[19] -= 0.3  # the steepest drop is into 19 and out of 18: np.gradient is most negative at 18/19
    for i in range(25, 40):
        losses[i] = losses[24]
    # pytorch-lr-finder's rule: the most negative np.gradient over the trimmed curve.
    index, lr = lr_finder.suggest_lr(lrs, losses, skip_start=5, skip_end=3, up_to_minimum=False)
    gradient = np.gradient(np.array(losses[5:37]))
    assert index == 5 + int(gradient.argmin()) and lr == lrs[index]
    assert index in (18, 19)
    # Where the minimum comes last (the test stopped at divergence), the default rule agrees.
    falling = list(np.linspace(3.0, 2.0, 40) - 0.2 * np.exp(-0.5 * ((np.arange(40) - 22) / 2.0) ** 2).cumsum() / 5)
    assert int(np.argmin(falling[5:37])) == 31
    assert lr_finder.suggest_lr(lrs, falling, 5, 3) == lr_finder.suggest_lr(lrs, falling, 5, 3, up_to_minimum=False)
    with pytest.raises(ValueError, match="Too few points"):
        lr_finder.suggest_lr(lrs[:12], losses[:12], skip_start=10, skip_end=5)
    # The whole sweep's rates beside a stopped test's losses had kept losses that skip_end should drop.
    with pytest.raises(ValueError, match="Give one loss per learning rate: 40 learning rates but 30 losses"):
        lr_finder.suggest_lr(lrs, losses[:30], skip_start=5, skip_end=3)


@pytest.mark.parametrize("up_to_minimum", [True, False])
def test_suggestion_ignores_the_nan_that_stopped_the_test(up_to_minimum):
    # With skip_end=0 the NaN stayed in: its neighbour's gradient was NaN, and argmin picked it.
    lrs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    losses = [3.0, 2.9, 2.0, 1.1, 1.0, float("nan")]
    assert lr_finder.suggest_lr(lrs, losses, 0, 0, up_to_minimum=up_to_minimum) == (2, 3.0)
    assert lr_finder.suggest_lr(lrs[:3], losses[:2] + [float("inf")], 0, 0, up_to_minimum=up_to_minimum) == (0, 1.0)


def test_json_record_writes_a_nan_loss_as_null():
    result = lr_finder.RangeTestResult(lrs=[0.1, 1.0, 10.0], losses=[2.3, 1.5, float("nan")], diverged=True)
    text = json.dumps(lr_finder.json_record(result, (1, 1.0)), allow_nan=False)  # strict JSON, or ValueError
    assert json.loads(text) == {"lrs": [0.1, 1.0, 10.0], "losses": [2.3, 1.5, None], "diverged": True,
                                "suggested_lr": 1.0, "suggested_index": 1}


_SWEEP = lr_finder.RangeTestResult(lrs=list(np.geomspace(1e-4, 1, 30)), losses=list(np.linspace(3, 1, 30)),
                                   diverged=False)


@pytest.mark.parametrize("result, settings, message", [
    (_SWEEP, {"skip_start": 2.5}, "skip_start must be a non-negative integer, got 2.5."),
    (_SWEEP, {"skip_start": -3}, "skip_start must be a non-negative integer, got -3."),
    (_SWEEP, {"skip_start": 20, "skip_end": 10},
     "Nothing to plot: 30 points recorded, none left after skipping 20 at the start and 10 at the end; skip fewer."),
    # matplotlib's own words: "x and y must have same first dimension, but have shapes (25,) and (15,)".
    (lr_finder.RangeTestResult(_SWEEP.lrs, _SWEEP.losses[:20], True), {},
     "Give one loss per learning rate: 30 learning rates but 20 losses"),
    # An IndexError, and a TypeError "cannot unpack non-iterable float object".
    (_SWEEP, {"suggestion": (30, 0.5)},
     "suggestion must be (index, lr) as suggest_lr returns, with an index of one of the 30 points, got (30, 0.5)."),
    (_SWEEP, {"suggestion": 0.5},
     "suggestion must be (index, lr) as suggest_lr returns, with an index of one of the 30 points, got 0.5."),
    (_SWEEP, {"suggestion": (3, "0.1")},
     "suggestion must be (index, lr) as suggest_lr returns, with an index of one of the 30 points, got (3, '0.1')."),
])
def test_plot_refuses_what_it_cannot_draw(result, settings, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        lr_finder.plot(result, tmp_path / "lr.png", **settings)
    assert not (tmp_path / "lr.png").exists()


def test_plot_marks_the_suggestion(tmp_path):
    from PIL import Image

    suggestion = lr_finder.suggest_lr(_SWEEP.lrs, _SWEEP.losses, 2, 2)
    lr_finder.plot(_SWEEP, tmp_path / "lr.png", skip_start=2, skip_end=2, suggestion=suggestion)
    with Image.open(tmp_path / "lr.png") as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    red = (abs(pixels[..., 0] - 0xD6) < 8) & (abs(pixels[..., 1] - 0x27) < 8) & (abs(pixels[..., 2] - 0x28) < 8)
    assert red.sum() > 20  # the suggestion's marker and its legend entry


def test_suggestion_ignores_a_recovery_after_a_spike():
    """A loss that dips, spikes and falls steeply again: pytorch-lr-finder's rule picks the
    recovery; up_to_minimum keeps to the valley before the spike."""
    lrs = list(np.logspace(-4, 1, 50))
    losses = list(np.linspace(2.8, 2.3, 30))  # steady descent to the minimum at index 29
    losses[20:30] = list(np.linspace(losses[20], 2.3, 10))  # a steeper stretch before the minimum
    losses += [2.6, 2.9, 2.85, 2.7, 2.5, 2.35, 2.34, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33, 2.33,
               2.33, 2.33]
    whole, _ = lr_finder.suggest_lr(lrs, losses, skip_start=2, skip_end=2, up_to_minimum=False)
    valley, _ = lr_finder.suggest_lr(lrs, losses, skip_start=2, skip_end=2)
    assert 30 < whole < 40  # on the far side of the spike
    expected = 2 + int(np.gradient(np.array(losses[2:30])).argmin())
    assert valley == expected and valley < 30


def test_range_test_leaves_the_state_untouched(tiny_dataset):
    model = models.ResNet18(width=4)
    make_optimizer = lambda schedule: optax.sgd(schedule, momentum=0.9)
    # A state in the middle of training: non-zero momentum buffers and moved BatchNorm statistics.
    mesh = train_lib.make_mesh()
    state = train_lib.replicate(
        train_lib.create_train_state(model, jax.random.key(0), make_optimizer(optax.constant_schedule(0.05))), mesh)
    step = train_lib.make_train_step(model, mesh, tiny_dataset.mean, tiny_dataset.std)
    state, _ = step(state, *train_lib.shard_batch((tiny_dataset.train_images[:32], tiny_dataset.train_labels[:32]), mesh))
    before = jax.device_get(state)

    def batches():
        while True:
            yield tiny_dataset.train_images[32:64], tiny_dataset.train_labels[32:64]

    result = lr_finder.range_test(model, {"params": state.params, "batch_stats": state.batch_stats}, make_optimizer,
                                  batches(), opt_state=state.opt_state, mean=tiny_dataset.mean, std=tiny_dataset.std,
                                  start_lr=1e-4, end_lr=100.0, num_iter=12, progress=False, mesh=mesh)
    assert 2 <= len(result.lrs) == len(result.losses) <= 12
    np.testing.assert_allclose(result.lrs, lr_finder.lr_sequence(1e-4, 100.0, 12)[: len(result.lrs)], rtol=1e-6)
    after = jax.device_get(state)  # still readable (not donated) and unchanged
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="structure"):
        lr_finder.range_test(model, {"params": state.params, "batch_stats": state.batch_stats},
                             lambda s: optax.adam(s), batches(), opt_state=state.opt_state, mean=tiny_dataset.mean,
                             std=tiny_dataset.std, num_iter=3, progress=False, mesh=mesh)
    odd = iter([(tiny_dataset.train_images[:3], tiny_dataset.train_labels[:3])])
    with pytest.raises(ValueError, match="A batch of 3 images does not split over the 2 devices; give batches of a "
                                         "multiple of 2."):
        lr_finder.range_test(model, {"params": state.params, "batch_stats": state.batch_stats}, make_optimizer, odd,
                             mean=tiny_dataset.mean, std=tiny_dataset.std, num_iter=3, progress=False, mesh=mesh)
    with pytest.raises(ValueError, match="must be a mapping with 'params' and 'batch_stats'"):
        lr_finder.range_test(model, {"params": state.params}, make_optimizer, batches(), mean=tiny_dataset.mean,
                             std=tiny_dataset.std, num_iter=3, progress=False, mesh=mesh)
    with pytest.raises(ValueError, match=r"^smooth_f must lie in \[0, 1\), got 1.5.$"):
        lr_finder.range_test(model, {"params": state.params, "batch_stats": state.batch_stats}, make_optimizer,
                             batches(), mean=tiny_dataset.mean, std=tiny_dataset.std, num_iter=3, smooth_f=1.5,
                             progress=False, mesh=mesh)


def test_with_validation_data_the_recorded_loss_is_the_validation_loss_after_each_step(tiny_dataset):
    # An optimizer that leaves the parameters as they are: each step then only moves the BatchNorm
    # running statistics, which the validation loss (eval mode) reads, so the expected losses can
    # be replayed with the model alone.
    model = models.ResNet18(width=4)
    variables = models.init_variables(model, jax.random.key(0))
    mean, std = tiny_dataset.mean, tiny_dataset.std
    train_batches = [(tiny_dataset.train_images[i:i + 32], tiny_dataset.train_labels[i:i + 32]) for i in (0, 32, 64)]
    val_images, val_labels = tiny_dataset.test_images, tiny_dataset.test_labels
    result = lr_finder.range_test(model, variables, lambda schedule: optax.set_to_zero(), iter(train_batches),
                                  mean=mean, std=std, num_iter=3, smooth_f=0.0, diverge_th=1e9,
                                  val_data=(val_images, val_labels), val_batch_size=16, progress=False)
    expected, batch_stats = [], variables["batch_stats"]
    for images, _ in train_batches:
        _, updates = model.apply({"params": variables["params"], "batch_stats": batch_stats},
                                 data_lib.normalize(images, mean, std), train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
        logits = model.apply({"params": variables["params"], "batch_stats": batch_stats},
                             data_lib.normalize(val_images, mean, std), train=False)
        expected.append(train_lib.evaluate(np.asarray(logits), val_labels)["loss"])
    assert len(set(expected)) == 3  # the statistics did move: each step has its own loss
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)


@pytest.mark.parametrize("max_lr", ["auto", "0.05"])
def test_cli_find_lr_writes_plot_and_suggestion(max_lr, official_folder, tmp_path, capsys):
    code = train_cli.main([
        "--workdir", str(tmp_path), "--config", str(ROOT / "configs" / "smoke.py"), "--config.width=4",
        "--config.epochs=1", "--config.batch_size=16", "--config.eval_batch_size=16", f"--config.max_lr={max_lr}",
        "--config.lr_finder.num_iter=12", f"--config.data_dir={str(official_folder)!r}", "--config.tensorboard=False",
    ] + (["--find-lr"] if max_lr != "auto" else []))
    out = capsys.readouterr().out
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "lr_finder.json").read_text())
    assert saved["suggested_lr"] is not None and len(saved["lrs"]) == len(saved["losses"])
    assert saved["suggested_lr"] == saved["lrs"][saved["suggested_index"]]
    assert (run_dir / "lr_finder.png").stat().st_size > 10_000
    assert f"suggested max LR {saved['suggested_lr']:.3g}" in out
    config = json.loads((run_dir / "config.json").read_text())
    if max_lr == "auto":
        assert config["max_lr"] == pytest.approx(saved["suggested_lr"])  # training used the suggestion
        assert f"Training with the suggested max_lr {saved['suggested_lr']:.3g}." in out
    else:  # --find-lr alone had trained with the config's max_lr without saying so
        assert config["max_lr"] == 0.05
        assert "Training with the config's max_lr 0.05; --config.max_lr=auto would train with the suggestion." in out


def test_a_range_test_that_diverges_within_its_skipped_points_keeps_its_record_and_training_goes_on(
        official_folder, tmp_path, capsys):
    # Started far too high, the sweep diverges at once. Its plot had found nothing left after
    # the skips and failed: train.py --find-lr stopped before training, said "skip fewer" (no
    # help here) and removed the run directory with the recorded losses.
    code = train_cli.main([
        "--workdir", str(tmp_path), "--config", str(ROOT / "configs" / "smoke.py"), "--config.width=4",
        "--config.epochs=1", "--config.batch_size=16", "--config.eval_batch_size=16", "--config.max_lr=0.05",
        "--config.lr_finder.start_lr=1000.0", "--config.lr_finder.end_lr=1e6", "--config.lr_finder.smooth_f=0.0",
        f"--config.data_dir={str(official_folder)!r}", "--config.tensorboard=False", "--find-lr",
    ])
    out = capsys.readouterr().out
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "lr_finder.json").read_text())
    steps = len(saved["lrs"])
    assert saved["diverged"] and saved["suggested_lr"] is None and 1 < steps <= 2 + 2 < 20
    assert len(saved["losses"]) == steps
    assert (f"LR range test: no suggestion. The loss diverged after {steps} of 20 steps, at lr "
            f"{saved['lrs'][-1]:.3g}, with too few points before it for a suggestion; start the sweep lower "
            "(config.lr_finder.start_lr).") in out
    assert (run_dir / "lr_finder.png").stat().st_size > 10_000
    assert len(json.loads((run_dir / "history.json").read_text())) == 1  # and training went on


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_iter=1", "config.lr_finder.num_iter must be an integer of at least 2, got 1."),
        ("skip_start=-1", "config.lr_finder.skip_start must be a non-negative integer, got -1."),
        ("start_lr=0.0", "config.lr_finder needs 0 < start_lr < end_lr, got 0.0 and 10.0."),
        ("step_mode='log'", "Unknown config.lr_finder.step_mode 'log'; choose 'exp' or 'linear'."),
        ("smooth_f=1.5", "config.lr_finder.smooth_f must lie in [0, 1), got 1.5."),
        ("diverge_th=0.5", "config.lr_finder.diverge_th must be greater than 1, got 0.5."),
        # smoke.py sweeps 20 points and skips 2 at the end.
        ("skip_start=18", "config.lr_finder skips 18 + 2 of its 20 points, leaving 0; a suggestion needs 2, so skip "
                          "fewer or raise num_iter."),
        ("skip_start=17", "config.lr_finder skips 17 + 2 of its 20 points, leaving 1; a suggestion needs 2, so skip "
                          "fewer or raise num_iter."),
    ],
)
def test_cli_bad_range_test_settings_stop_before_the_run_directory(override, message, tmp_path, capsys):
    # Before, these failed after the run directory was made (leaving it empty), or ran and
    # silently gave no suggestion (skip_start=-1) or a meaningless one (smooth_f=1.5); skips that
    # leave too few points ran the whole test and then failed at its plot, or gave no suggestion.
    code = train_cli.main(["--workdir", str(tmp_path), "--config", str(ROOT / "configs" / "smoke.py"),
                           "--find-lr-only", f"--config.lr_finder.{override}"])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_a_range_test_stopped_before_its_plot_leaves_no_run_directory(official_folder, tmp_path):
    # The run directory (and here its --workdir) is made before the range test; a stop (or an
    # error) before its plot and record were written had left it empty beside the real runs.
    status, err = sigterm_once(cli_command("train.py", "--workdir", tmp_path / "new" / "runs",
                                           "--config", ROOT / "configs" / "smoke.py",
                                           "--find-lr-only", "--config.width=4", "--config.batch_size=16",
                                           "--config.lr_finder.num_iter=500",
                                           f"--config.data_dir={str(official_folder)!r}"),
                               once_present(tmp_path, "new/runs/*"))
    assert status == 1, err[-2000:]
    assert err.splitlines()[-1] == "error: interrupted before training began."
    assert not list(tmp_path.iterdir())


def test_the_config_files_range_test_settings_are_valid():
    for name in ("default", "smoke", "learning_check"):
        lr_finder.validate_settings(load_config_file(ROOT / "configs" / f"{name}.py").lr_finder)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("del c.lr_finder['diverge_th']", "config.lr_finder lacks the key 'diverge_th'; start from configs/default.py"),
        ("c.lr_finder.num_iters = 50", "config.lr_finder has an unknown key 'num_iters'; known keys: diverge_th, "),
        ("del c['lr_finder']", "The config has no lr_finder settings for the LR range test; copy them from "),
    ],
)
def test_cli_range_test_settings_with_missing_or_unknown_keys(edit, message, tmp_path, capsys):
    config_file = tmp_path / "mine.py"
    config_file.write_text(f"from configs import smoke\n\n\ndef get_config():\n    c = smoke.get_config()\n"
                           f"    {edit}\n    return c\n")
    code = train_cli.main(["--workdir", str(tmp_path / "runs"), "--config", str(config_file), "--find-lr-only"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()

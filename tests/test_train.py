import _thread
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train as train_cli
from conftest import ROOT, cli_command, once_present, sigterm_once, synthetic_arrays, write_official_batches
from jaxcam import data as data_lib
from jaxcam import models
from jaxcam import rundir
from jaxcam import train as train_lib
from jaxcam.checkpoint import Checkpointer, CheckpointError, load_variables, write_json
from jaxcam.configuration import (CONFIG_KEYS, LR_FINDER_KEYS, ConfigError, apply_overrides, config_from_json,
                                  load_config_file)
from jaxcam.data import DataError


def tiny_config(**overrides):
    config = load_config_file(ROOT / "configs" / "default.py")
    config.update(dict(width=4, epochs=2, batch_size=32, eval_batch_size=16, print_summary=False, tensorboard=False,
                       max_lr=0.05, prefetch=2))
    config.update(overrides)
    return config


def train_first_epoch_then_interrupt(config, run_dir, dataset):
    """Train `config` in `run_dir` and stop after epoch 1 as Ctrl-C would: its checkpoint and history stay."""
    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lib.train_and_evaluate(config, run_dir, dataset=dataset, progress=False, on_epoch_end=interrupt,
                                     log=lambda s: None)


def test_two_cpu_devices_are_available():
    assert jax.device_count() == 2, "conftest sets --xla_force_host_platform_device_count=2"


def test_sharding_refuses_a_batch_that_does_not_split():
    mesh = train_lib.make_mesh(jax.devices()[:2])
    with pytest.raises(ValueError, match="A batch of 3 images does not split over the 2 devices; give batches of a "
                                         "multiple of 2."):
        train_lib.shard_batch((np.zeros((3, 32, 32, 3), np.uint8), np.zeros(3, np.int32)), mesh)
    images, labels = train_lib.shard_batch((np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int32)), mesh)
    assert len(images.sharding.device_set) == 2 and labels.shape == (4,)


@pytest.mark.parametrize("batch_size", [3, 1, 40])
def test_predict_splits_any_batch_size_over_the_devices(tiny_dataset, batch_size):
    model = models.ResNet18(width=4)
    variables = models.init_variables(model, jax.random.key(0))
    mesh = train_lib.make_mesh(jax.devices()[:2])
    predict_fn = train_lib.make_predict_fn(model, mesh, tiny_dataset.mean, tiny_dataset.std)
    images = tiny_dataset.test_images[:7]
    logits = train_lib.predict(predict_fn, variables, images, batch_size, mesh)
    expected = model.apply(variables, data_lib.normalize(images, tiny_dataset.mean, tiny_dataset.std), train=False)
    assert logits.shape == (7, 10)  # every image once, the padding dropped
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_data_parallel_step_equals_single_device_step(tiny_dataset):
    model = models.ResNet18(width=4)
    mean, std = tiny_dataset.mean, tiny_dataset.std
    tx = optax.sgd(0.1, momentum=0.9)
    images, labels = tiny_dataset.train_images[:16], tiny_dataset.train_labels[:16]
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
        mesh = train_lib.make_mesh(devices)
        step = train_lib.make_train_step(model, mesh, mean, std, label_smoothing=0.1)
        state = train_lib.replicate(train_lib.create_train_state(model, jax.random.key(0), tx), mesh)
        # One step: later steps amplify float rounding through near-constant BatchNorm channels
        # of this 4-channel model, which says nothing about the semantics compared here.
        state, metrics = step(state, *train_lib.shard_batch((images, labels), mesh))
        assert len(state.params["conv1"]["kernel"].sharding.device_set) == len(devices)
        results.append(jax.device_get((state.params, state.batch_stats, state.opt_state, metrics)))
    (p1, s1, o1, m1), (p2, s2, o2, m2) = results
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(close, p1, p2)
    jax.tree_util.tree_map(close, s1, s2)
    jax.tree_util.tree_map(close, o1, o2)  # the momentum buffer is the averaged gradient
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    assert m1["accuracy"] == m2["accuracy"]
    # The step changed the parameters (it is not a no-op that trivially matches).
    init = models.init_variables(model, jax.random.key(0))["params"]
    assert not np.allclose(p1["linear"]["kernel"], init["linear"]["kernel"])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_scores_labels_it_has_no_class_for_as_nan(label_smoothing):
    # one_hot makes an all-zero target of class 10 of 10 and of -1, which would score 0.
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    labels = jnp.array([3, 10, -1, 9])
    np.testing.assert_allclose(train_lib.cross_entropy(jnp.zeros((3, 10)), np.array([0, 1, 9])), np.log(10), rtol=1e-6)
    assert np.isnan(train_lib.cross_entropy(logits, labels, label_smoothing)[1])
    loss_fn = jax.jit(lambda logits, labels: train_lib.cross_entropy(logits, labels, label_smoothing))
    loss = np.asarray(loss_fn(logits, labels))
    assert np.isnan(loss[1]) and np.isnan(loss[2])
    valid = np.array([0, 3])
    np.testing.assert_allclose(loss[valid], train_lib.cross_entropy(logits[valid], labels[valid], label_smoothing),
                               rtol=1e-6)
    # The valid rows' gradients are those of the valid rows alone; the others get none.
    grads = jax.grad(lambda logits: jnp.nansum(loss_fn(logits, labels)))(logits)
    alone = jax.grad(lambda x: train_lib.cross_entropy(x, labels[valid], label_smoothing).sum())(logits[valid])
    np.testing.assert_allclose(grads[valid], alone, rtol=1e-6)
    assert not np.asarray(grads[1:3]).any()


def test_cross_entropy_with_label_smoothing():
    logits = np.array([[2.0, 0.0, -1.0]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum())
    expected = -(0.9 * log_probs[0, 0] + 0.1 / 3 * log_probs[0].sum())
    np.testing.assert_allclose(train_lib.cross_entropy(logits, np.array([0]), 0.1), [expected], rtol=1e-6)


def test_a_run_name_that_is_a_path_is_refused_before_anything_is_made(tmp_path):
    # create_run_dir had made the workdir and then failed in mkdir with Python's FileNotFoundError.
    with pytest.raises(ValueError, match="name starts the run directory's name, so it must be a non-empty name "
                                         "without '/', got 'a/b'."):
        rundir.create_run_dir(tmp_path / "runs", "a/b")
    assert not (tmp_path / "runs").exists()


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    config = tiny_config()
    full = train_lib.train_and_evaluate(config, tmp_path / "full", dataset=tiny_dataset, progress=False, log=lambda s: None)

    (tmp_path / "resumed").mkdir()
    train_first_epoch_then_interrupt(config, tmp_path / "resumed", tiny_dataset)
    assert Checkpointer(tmp_path / "resumed", create=False).latest_epoch() == 1
    resumed = train_lib.train_and_evaluate(config, tmp_path / "resumed", resume=True, dataset=tiny_dataset,
                                           progress=False, log=lambda s: None)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                           jax.device_get(resumed.state.params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.state.opt_state),
                           jax.device_get(resumed.state.opt_state))
    assert [r["test_acc"] for r in full.history] == [r["test_acc"] for r in resumed.history]
    assert len(json.loads((tmp_path / "resumed" / "history.json").read_text())) == 2
    assert int(resumed.state.step) == 2 * (128 // 32)
    # Resuming a finished run says so and changes nothing.
    logged = []
    again = train_lib.train_and_evaluate(config, tmp_path / "full", resume=True, dataset=tiny_dataset, progress=False,
                                         log=logged.append)
    assert any("already finished its 2 epochs; there is nothing to resume" in line for line in logged)
    # Data of other classes (a --resume --config.data_dir that points elsewhere) is refused.
    renamed = dataclasses.replace(tiny_dataset, class_names=tuple(f"kind{i}" for i in range(10)))
    with pytest.raises(DataError, match=r"was trained on the classes airplane, .*truck, but the data given has kind0, "
                                        r".*kind9; resume it on its own data."):
        train_lib.train_and_evaluate(config, tmp_path / "full", resume=True, dataset=renamed, progress=False,
                                     log=lambda s: None)
    assert again.history == json.loads((tmp_path / "full" / "history.json").read_text())
    assert Checkpointer(tmp_path / "full", create=False).latest_epoch() == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                           jax.device_get(again.state.params))


def test_a_config_given_as_a_plain_dict_trains(tiny_dataset, tmp_path):
    config = tiny_config(epochs=1).to_dict()
    result = train_lib.train_and_evaluate(config, tmp_path / "run", dataset=tiny_dataset, progress=False,
                                          log=lambda s: None)
    assert [r["epoch"] for r in result.history] == [1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 4


def test_the_closing_per_class_accuracies_name_a_class_without_test_images(tiny_dataset, tmp_path):
    keep = tiny_dataset.test_labels != 3
    assert keep.sum() < len(keep)  # the 40 test images hold a cat to drop
    dataset = dataclasses.replace(tiny_dataset, test_images=tiny_dataset.test_images[keep],
                                  test_labels=tiny_dataset.test_labels[keep])
    logged = []
    train_lib.train_and_evaluate(tiny_config(epochs=1), tmp_path / "run", dataset=dataset, progress=False,
                                 log=logged.append)
    lines = logged[logged.index("Per-class test accuracy:") + 1:]
    assert [line.split()[0] for line in lines] == list(dataset.class_names)
    assert lines[3] == "  cat          no test images"
    assert all(re.fullmatch(r"  \w+ +\d+\.\d\d%", line) for i, line in enumerate(lines) if i != 3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    config = tiny_config()
    train_first_epoch_then_interrupt(config, tmp_path, tiny_dataset)
    good, meta = load_variables(tmp_path, "latest")
    diverging = tiny_config(max_lr=1e30)
    # A run whose recipe diverges in its second epoch: its config.json says so, as resume=True requires.
    write_json(tmp_path / "config.json", rundir.config_record(diverging))
    kept_epoch_1 = (r"loss became (nan|inf) in epoch 2/2 \(step \d+\); training stopped, and the checkpoint of epoch 1 is "
                    r"kept \(max_lr 1e\+30 may be too high; train.py --find-lr suggests one\)\.$")
    with pytest.raises(train_lib.TrainingDiverged, match=kept_epoch_1):
        train_lib.train_and_evaluate(diverging, tmp_path, resume=True, dataset=tiny_dataset, progress=False,
                                     log=lambda s: None)
    kept, meta_after = load_variables(tmp_path, "latest")
    assert meta_after["epoch"] == meta["epoch"] == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, good, kept)
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())] == [1]
    # Diverging in the first epoch: the message must not promise a checkpoint that was never written.
    with pytest.raises(train_lib.TrainingDiverged, match="in epoch 1/2 .*no epoch had finished, so there is no checkpoint"):
        train_lib.train_and_evaluate(diverging, tmp_path / "fresh", dataset=tiny_dataset, progress=False,
                                     log=lambda s: None)
    assert Checkpointer(tmp_path / "fresh", create=False).latest_epoch() is None


def test_outputs_blown_up_in_an_epochs_last_step_stop_the_run_before_saving(tiny_dataset, tmp_path):
    # One step per epoch (128 images, batch 128): the loss is read before each update, so an update
    # that blows the parameters up passed the loss check. The run "finished" with NaN test losses,
    # accuracies that counted class 0, and non-finite parameters saved as its latest checkpoint.
    one_step = dict(batch_size=128, eval_batch_size=40)
    config = tiny_config(**one_step)
    train_first_epoch_then_interrupt(config, tmp_path, tiny_dataset)
    good, _ = load_variables(tmp_path, "latest")
    blowing_up = tiny_config(max_lr=1e30, **one_step)
    write_json(tmp_path / "config.json", rundir.config_record(blowing_up))
    with pytest.raises(train_lib.TrainingDiverged,
                       match=r"^The model's outputs on the test images became NaN or infinite after epoch 2/2, so its "
                             r"checkpoint was not saved; training stopped, and the checkpoint of epoch 1 is kept \(max_lr 1e\+30 "
                             r"may be too high; train.py --find-lr suggests one\)\.$"):
        train_lib.train_and_evaluate(blowing_up, tmp_path, resume=True, dataset=tiny_dataset, progress=False,
                                     log=lambda s: None)
    kept, meta = load_variables(tmp_path, "latest")
    assert meta["epoch"] == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, good, kept)
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())] == [1]

    with pytest.raises(train_lib.TrainingDiverged, match=r"after epoch 1/2, so its checkpoint was not saved; "
                                                         r"training stopped, and no epoch had finished, so there is no checkpoint to keep \(max_lr 1e\+30 "
                                                         r"may be too high; train.py --find-lr suggests one\)\.$"):
        train_lib.train_and_evaluate(blowing_up, tmp_path / "fresh", dataset=tiny_dataset, progress=False,
                                     log=lambda s: None)
    assert Checkpointer(tmp_path / "fresh", create=False).latest_epoch() is None
    assert not (tmp_path / "fresh" / "history.json").exists()


def test_evaluate_scores_logits_against_labels():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    summary = train_lib.evaluate(np.log(probabilities) + 5.0, np.array([0, 2, 0]))  # a shift changes no softmax
    assert summary["correct"] == 2 and summary["total"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["loss"] == pytest.approx(-np.log([0.7, 0.8, 0.3]).mean())


@pytest.mark.parametrize("logits, labels, message", [
    (np.zeros((2, 3)), [0, -1], "Class label -1 is out of range for 3 classes."),
    (np.zeros((2, 3)), [0, 5], "Class label 5 is out of range for 3 classes."),
    (np.zeros((2, 3)), [0, 1, 2], r"evaluate takes logits \(N, K\) of at least one example and labels \(N,\), "
                                  r"got shapes \(2, 3\) and \(3,\)"),
    (np.zeros((0, 3)), [], r"got shapes \(0, 3\) and \(0,\)"),
    (np.zeros((2, 3)), [0.0, 1.0], "Class labels must be integers, got float64."),
])
def test_evaluate_refuses_labels_that_do_not_fit(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        train_lib.evaluate(logits, np.array(labels))


def test_train_epoch_measures_the_wait_for_data():
    step = jax.jit(lambda count, images, labels: (count + 1, {"loss": jnp.mean(images), "accuracy": jnp.mean(labels)}))

    def slow_batches(n, delay):
        for i in range(n):
            time.sleep(delay)  # a producer slower than the step: the step must wait for it
            yield np.full((4, 2), i, np.float32), np.ones(4, np.float32)

    started = time.perf_counter()
    count, metrics = train_lib.train_epoch(step, 0, slow_batches(5, 0.05), 5, "wait", progress=False)
    elapsed = time.perf_counter() - started
    assert int(count) == 5 and metrics["loss"] == 2.0 and metrics["accuracy"] == 1.0
    assert 5 * 0.05 <= metrics["data_wait"] <= elapsed


def test_optimizers_build_and_unknown_names_fail():
    for name in ("sgd", "adam", "adamw"):
        tx, lr = train_lib.create_optimizer(tiny_config(optimizer=name), total_steps=10)
        params = {"w": np.ones(3, np.float32)}
        updates, _ = tx.update({"w": np.ones(3, np.float32)}, tx.init(params), params)
        assert np.all(np.asarray(updates["w"]) < 0)
    with pytest.raises(ConfigError, match="Unknown optimizer 'lamb'"):
        train_lib.validate_config(tiny_config(optimizer="lamb"))


def test_max_lr_auto_needs_the_lr_range_test(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"^config.max_lr is 'auto': run the LR range test first"):
        train_lib.train_and_evaluate(tiny_config(max_lr="auto"), tmp_path / "run", dataset=tiny_dataset)
    assert not (tmp_path / "run").exists()


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert train_lib.resolve_dtype("auto", "gpu") == train_lib.resolve_dtype("auto", "tpu") == "bfloat16"
    assert train_lib.resolve_dtype("auto", "cpu") == "float32"
    # bfloat16 matrix units came with Ampere (8.0); on Colab's T4 (7.5) or a V100 (7.0) XLA computes
    # bfloat16 in float32 with conversions, slower than float32 itself.
    for capability, expected in (("7.5", "float32"), ("7.0", "float32"), ("6.0", "float32"), ("8.0", "bfloat16"),
                                 ("8.9", "bfloat16"), ("9.0", "bfloat16"), ("10.0", "bfloat16"), ("gfx942", "bfloat16")):
        assert train_lib.resolve_dtype("auto", "gpu", capability) == expected, capability
    assert train_lib.resolve_dtype("bfloat16", "gpu", "7.5") == "bfloat16"  # asked for by name: as asked
    assert tiny_config().dtype == "auto"  # the default recipe
    assert train_lib.build(tiny_config(), 10).dtype == jnp.float32  # this machine is a CPU
    assert train_lib.build(tiny_config(dtype="bfloat16"), 10).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype 'float16'; choose one of auto, float32, bfloat16"):
        train_lib.build(tiny_config(dtype="float16"), 10)


def optimized_weights(tx, w0, grads):
    """The weights `w0` after `tx` applied each of `grads` in turn."""
    params, opt_state = {"w": w0}, tx.init({"w": w0})
    for g in grads:
        updates, opt_state = tx.update({"w": g}, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params["w"]


def torch_optimized_weights(torch, w0, grads, make_optimizer, make_scheduler=None):
    """The same with the torch optimizer `make_optimizer([w])` (and its scheduler, stepped after each step)."""
    w = torch.nn.Parameter(torch.tensor(w0))
    optimizer = make_optimizer([w])
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    for g in grads:
        w.grad = torch.tensor(g)
        optimizer.step()
        if scheduler:
            scheduler.step()
    return w.detach().numpy()


def test_sgd_matches_torch_sgd_with_weight_decay_and_nesterov():
    torch = pytest.importorskip("torch")
    config = tiny_config(schedule="constant", max_lr=0.1, cycle_momentum=False, momentum=0.9, weight_decay=5e-4)
    tx, _ = train_lib.create_optimizer(config, total_steps=5)
    w0 = np.array([1.0, -2.0, 3.0], np.float32)
    grads = [np.array([0.5, 0.1, -0.3], np.float32) * (k + 1) for k in range(5)]
    expected = torch_optimized_weights(
        torch, w0, grads, lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    np.testing.assert_allclose(optimized_weights(tx, w0, grads), expected, rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_optimizer_with_onecycle_matches_torch_step_for_step(optimizer, three_phase):
    # The default recipe's optimizer under OneCycleLR, momentum (Adam's beta1) cycling included:
    # the k-th update must use the k-th step's lr and momentum, as PyTorch's scheduler sets them.
    torch = pytest.importorskip("torch")
    steps, max_lr = 30, 0.4
    config = tiny_config(optimizer=optimizer, max_lr=max_lr, three_phase=three_phase)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=5).astype(np.float32)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(steps)]
    tx, _ = train_lib.create_optimizer(config, total_steps=steps)
    wd = config.weight_decay
    make_optimizer = {
        "sgd": lambda w: torch.optim.SGD(w, lr=max_lr, momentum=0.9, nesterov=True, weight_decay=wd),
        "adam": lambda w: torch.optim.Adam(w, lr=max_lr, betas=(0.9, config.beta2), weight_decay=wd),
        "adamw": lambda w: torch.optim.AdamW(w, lr=max_lr, betas=(0.9, config.beta2), weight_decay=wd),
    }[optimizer]
    expected = torch_optimized_weights(torch, w0, grads, make_optimizer, lambda optimizer: (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=steps, pct_start=config.pct_start, div_factor=config.div_factor,
            final_div_factor=config.final_div_factor, three_phase=three_phase, base_momentum=config.base_momentum,
            max_momentum=config.max_momentum)))
    np.testing.assert_allclose(optimized_weights(tx, w0, grads), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- the CLI


def run_cli(args, capsys):
    code = train_cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


TINY = ["--config", ROOT / "configs" / "smoke.py", "--config.width=4", "--config.epochs=1", "--config.batch_size=32",
        "--config.eval_batch_size=16", "--config.tensorboard=False"]


def test_resume_of_a_run_stopped_in_its_first_epoch_starts_over(tiny_dataset, tmp_path):
    # What Ctrl-C during epoch 1 leaves: config.json and empty checkpoint folders, no history.
    config = tiny_config(epochs=1)
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    Checkpointer(run_dir).close()
    logged = []
    resumed = train_lib.train_and_evaluate(config, run_dir, resume=True, dataset=tiny_dataset, progress=False,
                                           log=logged.append)
    assert any("stopped before its first epoch ended, so it starts again from epoch 1" in line for line in logged)
    full = train_lib.train_and_evaluate(config, tmp_path / "full", dataset=tiny_dataset, progress=False,
                                        log=lambda s: None)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                           jax.device_get(resumed.state.params))
    # With a history but no checkpoint (checkpoints deleted), starting over would overwrite the history.
    history = (run_dir / "history.json").read_text()
    shutil.rmtree(run_dir / "checkpoints" / "latest" / "1")
    with pytest.raises(CheckpointError, match="No latest checkpoint"):
        train_lib.train_and_evaluate(config, run_dir, resume=True, dataset=tiny_dataset, progress=False,
                                     log=lambda s: None)
    assert (run_dir / "history.json").read_text() == history


def test_training_again_into_a_run_directory_is_refused_and_changes_nothing(smoke_run, tiny_dataset, tmp_path):
    # A notebook cell run twice: the second call overwrote config.json, trained an epoch and then
    # failed with orbax's StepAlreadyExistsError at its first save.
    run_dir = shutil.copytree(smoke_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    config = tiny_config(epochs=3)
    with pytest.raises(ConfigError, match=r"already holds a run; train in a new run directory "
                                          r"\(rundir.create_run_dir\), or continue this one with resume=True."):
        train_lib.train_and_evaluate(config, run_dir, dataset=tiny_dataset, progress=False, log=lambda s: None)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resuming_with_other_settings_is_refused(smoke_run, official_folder, tmp_path):
    # The library's resume=True trained on with whatever config it was given: a 2-epoch run
    # "resumed" with epochs=3 trained a third epoch on another schedule while config.json said 2.
    run_dir = shutil.copytree(smoke_run, tmp_path / "run")
    own_data = data_lib.load_cifar10(official_folder)  # what the smoke run was trained on
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    config = config_from_json(run_dir / "config.json")
    config.epochs, config.max_lr = 3, 0.5
    with pytest.raises(ConfigError, match=r"differs from the run's .*config.json' in epochs \(2 there, 3 here\), "
                                          r"max_lr \(0.2 there, 0.5 here\); a resumed run keeps its own settings"):
        train_lib.train_and_evaluate(config, run_dir, resume=True, dataset=own_data, progress=False,
                                     log=lambda s: None)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # Where the data lies, and settings that change nothing trained, may differ.
    config = config_from_json(run_dir / "config.json")
    config.update(dict(data_dir="/elsewhere", prefetch=1, tensorboard=False, print_summary=False))
    logged = []
    train_lib.train_and_evaluate(config, run_dir, resume=True, dataset=own_data, progress=False, log=logged.append)
    assert logged == [f"{run_dir} already finished its 2 epochs; there is nothing to resume."]


def test_cli_trains_and_writes_the_run_directory(official_folder, tmp_path, capsys):
    code, out, err = run_cli(["--workdir", tmp_path, *TINY, f"--config.data_dir={str(official_folder)!r}"], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("smoke_") and len(run_dir.name) == len("smoke_YYYYMMDD_HHMMSS")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["width"] == 4 and config["data_dir"] == str(official_folder)
    (record,) = json.loads((run_dir / "history.json").read_text())
    assert set(record) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"}
    assert 0 <= record["data_wait"] <= record["epoch_time"]
    assert (run_dir / "checkpoints" / "latest" / "1").is_dir() and (run_dir / "checkpoints" / "best" / "1").is_dir()
    assert "Accuracy: " in out and "/30 (" in out
    assert "Compute dtype: float32 (config.dtype='auto', cpu)." in out
    variables, meta = load_variables(run_dir)
    assert meta["epoch"] == 1 and variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.model='resnet50'"], "Unknown model 'resnet50'"),
        (["--config.optimizer='lamb'"], "Unknown optimizer 'lamb'"),
        (["--config.dtype='float16'"], "Unknown dtype 'float16'"),
        (["--config.epoch=3"], "Unknown config key 'epoch'"),
        (["--config.batch_size=big"], "config.batch_size takes an integer, got 'big'."),
        (["--config.lr_finder=3"], "config.lr_finder is a group of settings; set one of them as "
                                   "--config.lr_finder.KEY=VALUE (diverge_th, end_lr, num_iter, "),
        (["--config.data_dir='/nonexistent/cifar'"], "does not exist"),
        (["--config.cutout_prob=2"], "config.cutout_prob must lie in [0, 1], got 2.0."),
        (["--config.crop_padding=-1"], "config.crop_padding must be a non-negative integer, got -1."),
        (["--config.seed=-1"], "config.seed must be an integer in 0..2**63 - 1, got -1."),
        ([f"--config.seed={2**64}"], f"config.seed must be an integer in 0..2**63 - 1, got {2**64}."),
    ],
)
def test_cli_bad_input_gives_one_clear_error(extra, message, official_folder, tmp_path, capsys):
    code, out, err = run_cli(["--workdir", tmp_path, *TINY, f"--config.data_dir={str(official_folder)!r}", *extra], capsys)
    assert code == 1
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no run directory left behind


def test_cli_truncated_data(tmp_path, capsys):
    from conftest import synthetic_arrays, write_official_batches

    folder = write_official_batches(tmp_path / "data" / "cifar-10-batches-py", *synthetic_arrays(100, 30))
    raw = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(raw[:1000])
    code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, f"--config.data_dir={str(folder)!r}"], capsys)
    assert code == 1 and "data_batch_4" in err and "truncated" in err


def test_a_relative_data_dir_is_saved_absolute(official_folder, tmp_path, monkeypatch, capsys):
    # explain.py and --resume read the data from config.json, often from another directory.
    monkeypatch.chdir(official_folder.parent)
    code, _, err = run_cli(["--workdir", tmp_path, *TINY, f"--config.data_dir={official_folder.name!r}"], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(official_folder)
    monkeypatch.chdir(tmp_path)
    from jaxcam.explain import load_run

    assert len(load_run(run_dir).dataset.test_images) == 30


def test_cli_unwritable_workdir(official_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["--workdir", blocker / "runs", *TINY, f"--config.data_dir={str(official_folder)!r}"], capsys)
    assert code == 1 and f"Cannot write to workdir {str(blocker / 'runs')!r} ({str(blocker)!r} is a file, not a folder)." in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=33", "config.batch_size 33 must be a multiple of the 2 devices, which share each batch."),
        ("eval_batch_size=7", "config.eval_batch_size 7 must be a multiple of the 2 devices, which share each batch."),
        ("batch_size=128", "config.batch_size 128 is larger than the 100 training images."),
    ],
)
def test_cli_batch_sizes_that_do_not_fit_stop_before_the_run_directory(official_folder, tmp_path, capsys, override,
                                                                       message):
    # They depend on the devices and the data, so they were found only after the run directory was made.
    code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, f"--config.data_dir={str(official_folder)!r}",
                            f"--config.{override}"], capsys)
    assert code == 1 and err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ('[{"epoch": 1, "lr"', r"is not valid JSON \(Expecting ':' delimiter"),
    (b"\xff[]", "is not valid JSON"),
    ('{"epoch": 1}', "must hold a list of per-epoch records, got a dict."),
    ('[{"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.2, "test_loss": 2.1}]',
     "is not a jaxcam history: record 0 has no number for 'test_acc'."),
    ('[3]', "is not a jaxcam history: record 0 has no number for 'epoch', 'lr', 'train_loss', 'train_acc', 'test_loss', 'test_acc'."),
])
def test_read_history_names_the_damaged_file(text, message, tmp_path):
    (tmp_path / "history.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^'{re.escape(str(tmp_path / 'history.json'))}' {message}"):
        rundir.read_history(tmp_path)


def test_read_history_keeps_a_nan_test_loss(tmp_path):
    record = {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.2, "test_loss": float("nan"), "test_acc": 0.1}
    (tmp_path / "history.json").write_text(json.dumps([record]))
    (read,) = rundir.read_history(tmp_path)
    assert np.isnan(read["test_loss"]) and read["test_acc"] == 0.1
    assert rundir.read_history(tmp_path / "elsewhere") == []


def test_cli_resume_with_corrupt_checkpoint(official_folder, tmp_path, capsys):
    code, _, err = run_cli(["--workdir", tmp_path, *TINY, f"--config.data_dir={str(official_folder)!r}"], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    history_before = (run_dir / "history.json").read_text()
    # The checkpoint holds the history up to it, so a damaged history.json is rewritten from it.
    (run_dir / "history.json").write_text('{"epoch": 1}')
    code, _, err = run_cli(["--workdir", tmp_path, "--resume"], capsys)
    assert code == 0, err
    assert (run_dir / "history.json").read_text() == history_before
    for f in (run_dir / "checkpoints" / "latest" / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    code, _, err = run_cli(["--workdir", tmp_path, "--resume"], capsys)
    assert code == 1 and "corrupt" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "history.json").read_text() == history_before


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--config", ROOT / "configs" / "smoke.py"], "drop --config."),
        (["--config.epochs=5"], "drop --config.* overrides other than the data's location."),
        (["--find-lr"], "drop --find-lr."),
        (["--config", ROOT / "configs" / "smoke.py", "--config.epochs=5", "--config.data_dir=/data"],
         "drop --config and --config.* overrides other than the data's location."),
    ],
)
def test_cli_resume_refuses_settings_it_would_ignore(extra, named, tmp_path, capsys):
    # Before, --config and --find-lr were silently ignored on resume.
    code, _, err = run_cli(["--workdir", tmp_path, "--resume", *extra], capsys)
    assert code == 1 and err == f"error: --resume continues a run with its saved config.json, so {named}\n"


def test_cli_resume_finds_data_that_moved(official_folder, tmp_path, capsys):
    # A run copied to another machine finds its data elsewhere; --resume had refused every override.
    shutil.copytree(official_folder, tmp_path / "here" / "cifar-10-batches-py")
    code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, f"--config.data_dir={str(tmp_path / 'here')!r}"],
                           capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    before = json.loads((run_dir / "config.json").read_text())
    (tmp_path / "here").rename(tmp_path / "there")
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--resume"], capsys)
    assert code == 1 and "does not exist" in err
    code, out, err = run_cli(["--workdir", tmp_path / "runs", "--resume", "--config.data_dir=there"], capsys)
    assert code == 1 and "does not exist" in err  # a relative path is taken from the working directory
    assert json.loads((run_dir / "config.json").read_text()) == before  # bad data changes nothing
    code, out, err = run_cli(["--workdir", tmp_path / "runs", "--resume", f"--config.data_dir={str(tmp_path / 'there')!r}"],
                             capsys)
    assert code == 0 and "already finished its 1 epoch; there is nothing to resume." in out, err
    # Recorded, so that explain.py and a later --resume find it too; nothing else changes.
    assert json.loads((run_dir / "config.json").read_text()) == {**before, "data_dir": str(tmp_path / "there")}


def test_cli_resume_on_other_images_is_refused_and_changes_nothing(official_folder, tmp_path, capsys):
    code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, f"--config.data_dir={str(official_folder)!r}"],
                           capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    before = (run_dir / "config.json").read_bytes()
    other = write_official_batches(tmp_path / "other" / "cifar-10-batches-py", *synthetic_arrays(160, 30, seed=5))
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--resume", f"--config.data_dir={str(other)!r}"], capsys)
    assert code == 1 and err == (f"error: {str(run_dir)!r} was trained on other training images than those of the "
                                 "data given (the channel mean and std recorded in its checkpoint differ from "
                                 "theirs); resume it on its own data.\n")
    assert (run_dir / "config.json").read_bytes() == before  # it had recorded the refused data as the run's
    # The same images in another order (tensorflow-datasets' order, say) are the run's data.
    train_images, train_labels, test_images, test_labels = synthetic_arrays(100, 30)
    order = np.random.default_rng(3).permutation(100)
    shuffled = write_official_batches(tmp_path / "shuffled" / "cifar-10-batches-py", train_images[order],
                                      train_labels[order], test_images, test_labels)
    code, out, err = run_cli(["--workdir", tmp_path / "runs", "--resume", f"--config.data_dir={str(shuffled)!r}"],
                             capsys)
    assert code == 0 and "already finished its 1 epoch; there is nothing to resume." in out, err
    assert json.loads((run_dir / "config.json").read_text()) == {**json.loads(before), "data_dir": str(shuffled)}


def test_cli_config_must_be_a_python_file(tmp_path, capsys):
    notes = tmp_path / "config.txt"
    notes.write_text("epochs = 3")
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--config", notes], capsys)
    assert code == 1 and "is not a Python file" in err and len(err.strip().splitlines()) == 1


def test_cli_finds_the_default_config_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The default config loads (its own error, not "does not exist"); epochs=0 stops before any data is read.
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--config.epochs=0"], capsys)
    assert code == 1 and err == "error: config.epochs must be a positive integer, got 0.\n"


def test_dot_inside_a_run_names_the_run(tmp_path, monkeypatch):
    # "." and ".." have no parents of their own; a user standing in a run's checkpoints folder
    # still hears which run to pass.
    run_dir = tmp_path / "resnet18_20261130_120000"
    (run_dir / "checkpoints" / "latest").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    monkeypatch.chdir(run_dir / "checkpoints" / "latest")
    for given in [".", "..", "../latest"]:
        with pytest.raises(ConfigError, match=f"inside the run directory {re.escape(repr(str(run_dir)))}"):
            rundir.check_run_dir(given)
    assert rundir.check_run_dir("../..") == Path("../..")


def test_the_newest_run_is_found_by_the_time_in_its_name(tmp_path):
    # A copied workdir (cp -r) gives every folder a new mtime, in copy order; --resume with a new
    # data_dir rewrites an old run's config.json. The name keeps when each run was created.
    names = ["resnet18_20261121_120000", "resnet18_20261122_090000_1", "resnet18_20261122_090000", "mine"]
    for age, name in enumerate(names):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        os.utime(tmp_path / name / "config.json", (1e9 - 1000 * age, 1e9 - 1000 * age))  # the oldest name is newest
    assert rundir.latest_run_dir(tmp_path) == tmp_path / "resnet18_20261122_090000_1"
    os.utime(tmp_path / "mine" / "config.json", None)  # a folder named otherwise counts by its mtime: now
    assert rundir.latest_run_dir(tmp_path) == tmp_path / "mine"


def test_cli_resume_of_the_workdir_names_the_newest_run(official_folder, tmp_path, capsys):
    code, _, err = run_cli(["--workdir", tmp_path, *TINY, f"--config.data_dir={str(official_folder)!r}"], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    code, _, err = run_cli(["--workdir", tmp_path, "--resume", tmp_path], capsys)
    assert code == 1 and err.endswith(f"it holds run directories, so pass one, such as the newest {str(run_dir)!r}.\n")
    code, _, err = run_cli(["--resume", run_dir / "checkpoints" / "latest"], capsys)
    assert code == 1 and err.endswith(f"it lies inside the run directory {str(run_dir)!r}, so pass that.\n")


def test_cli_resume_without_runs(tmp_path, capsys):
    code, _, err = run_cli(["--workdir", tmp_path, "--resume"], capsys)
    assert code == 1 and "No run directory" in err
    code, _, err = run_cli(["--workdir", tmp_path, "--resume", tmp_path / "typo"], capsys)
    assert code == 1 and err == f"error: The run directory {str(tmp_path / 'typo')!r} does not exist.\n"
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("args", [["--workdir", ""], ["--workdir", "w", "--config", ""], ["--resume", ""],
                                  ["--workdir", "w", "--resume", ""]])
def test_cli_an_empty_path_is_refused_not_taken_for_the_working_directory(official_folder, tmp_path, capsys,
                                                                         monkeypatch, args):
    # `--workdir "$DIR"` with DIR unset had put the run directory in the working directory.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*TINY, f"--config.data_dir={str(official_folder)!r}", *args], capsys)
    flag = args[-2]
    assert code == 1 and err == f"error: {flag} is an empty string (an unset shell variable?); give a path.\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_resume_with_a_run_directory_as_the_workdir_names_the_command_that_resumes_it(tmp_path, capsys):
    # explain.py's --workdir is the run itself, so `train.py --workdir RUN_DIR --resume` is a natural
    # slip; it had said only that there was no run directory in RUN_DIR.
    run_dir = tmp_path / "my runs" / "resnet18_20261201_000000"
    (run_dir / "checkpoints" / "latest").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    quoted = shlex.quote(str(run_dir))
    code, _, err = run_cli(["--workdir", run_dir, "--resume"], capsys)
    assert code == 1 and err == (f"error: No run directory with a config.json in {str(run_dir)!r} to resume; it is "
                                 f"a run directory itself: train.py --resume {quoted} continues it.\n")
    inside = run_dir / "checkpoints" / "latest"
    code, _, err = run_cli(["--workdir", inside, "--resume"], capsys)
    assert code == 1 and err == (f"error: No run directory with a config.json in {str(inside)!r} to resume; it lies "
                                 f"inside the run directory {str(run_dir)!r}: train.py --resume {quoted} continues it.\n")
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "config.json", "latest"]


def resume_advice(run_dir):
    """What train.py says on stderr after a stop once training has begun."""
    return (f"error: interrupted; python train.py --resume {shlex.quote(str(run_dir))} continues from the last epoch "
            "that ended.")


def test_cli_ctrl_c_names_the_command_that_resumes_the_run(official_folder, tmp_path, capsys,
                                                         python_sigint_handler):
    returned = threading.Event()  # never interrupt the test itself, should training end first

    def ctrl_c_once_an_epoch_has_ended():
        while not returned.is_set():
            if list(tmp_path.glob("runs/*/history.json")):
                _thread.interrupt_main()  # what Ctrl-C does: SIGINT's handler runs in the main thread
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=ctrl_c_once_an_epoch_has_ended, daemon=True)
    watcher.start()
    try:
        code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, "--config.epochs=12",
                                f"--config.data_dir={str(official_folder)!r}"], capsys)
    finally:
        returned.set()
        watcher.join()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 1 and err == resume_advice(run_dir) + "\n"
    ended = len(rundir.read_history(run_dir))
    assert 1 <= ended < 12
    code, out, err = run_cli(["--resume", run_dir], capsys)  # the command as the advice gives it
    assert code == 0, err
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == list(range(1, 13))


def test_sigterm_stops_train_py_as_ctrl_c_does(official_folder, tmp_path):
    # kill, timeout, a scheduler's time limit or a preempted VM: SIGTERM had ended the process
    # at once, silently, possibly between an epoch's checkpoint and its history record.
    status, err = sigterm_once(cli_command("train.py", "--workdir", tmp_path, *TINY, "--config.epochs=12",
                                           f"--config.data_dir={str(official_folder)!r}"),
                               once_present(tmp_path, "*/history.json"))
    (run_dir,) = tmp_path.iterdir()
    assert status == 1, err[-2000:]
    assert err.splitlines()[-1] == resume_advice(run_dir)
    ended = len(rundir.read_history(run_dir))
    assert 1 <= ended < 12 and Checkpointer(run_dir, create=False).latest_epoch() == ended  # whole epochs only


def test_sigterm_during_the_first_compilation_ends_in_one_sentence_not_a_crash(official_folder, tmp_path):
    # JAX compiles on a worker thread; the stop only ended the main thread's wait, and Python's
    # finalization then destroyed JAX's client under that thread: a segmentation fault (exit 139)
    # after the sentence. Without the cache the train step here traces in about 1 s, then compiles
    # for about 4 s: the signal lands in the compilation (the old code crashed in 4 of 4 tries).
    def into_the_compilation(process):
        for line in process.stdout:
            if line.startswith("Run directory:"):  # printed just before the steps are built and compiled
                time.sleep(2.5)
                return

    status, err = sigterm_once(cli_command("train.py", "--workdir", tmp_path, *TINY,
                                           f"--config.data_dir={str(official_folder)!r}"),
                               into_the_compilation,
                               env={**os.environ, "JAX_COMPILATION_CACHE_DIR": "", "PYTHONUNBUFFERED": "1"})
    assert status == 1, err[-2000:]
    # The steps compile before anything is written, so the new run directory goes again.
    assert err.splitlines()[-1] == "error: interrupted before training began."
    assert not list(tmp_path.iterdir())


def test_cli_resume_without_a_run_dir_needs_the_workdir(capsys):
    for args in (["--resume"], []):
        with pytest.raises(SystemExit) as exited:
            run_cli(args, capsys)
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--resume without a RUN_DIR continues the newest run in --workdir, so give --workdir or the run directory" \
        in err and "the following arguments are required: --workdir" in err


def test_overrides_parse_types():
    config = tiny_config()
    apply_overrides(config, ["--config.max_lr=1", "--config.flip=False", "--config.lr_finder.num_iter=7",
                             "--config.data_dir=/some/where", "--config.max_lr=auto"])
    assert config.max_lr == "auto" and config.flip is False and config.lr_finder.num_iter == 7
    assert config.data_dir == "/some/where"
    # Lower-case booleans, as absl's (and ml_collections') flags take them; other words are refused.
    apply_overrides(config, ["--config.flip=true", "--config.nesterov=false", "--config.tensorboard=FALSE"])
    assert config.flip is True and config.nesterov is False and config.tensorboard is False
    with pytest.raises(ConfigError, match=r"config.flip takes True or False, got 'yes'."):
        apply_overrides(config, ["--config.flip=yes"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("cutout_prob", 1.5, "config.cutout_prob must lie in [0, 1], got 1.5."),
        ("pct_start", -0.1, "config.pct_start must lie in [0, 1], got -0.1."),
        ("label_smoothing", 1.0, "config.label_smoothing must lie in [0, 1), got 1.0."),
        ("momentum", 1.0, "config.momentum must lie in [0, 1), got 1.0."),
        ("base_momentum", -0.5, "config.base_momentum must lie in [0, 1), got -0.5."),
        ("max_momentum", 2.0, "config.max_momentum must lie in [0, 1), got 2.0."),
        ("beta2", float("nan"), "config.beta2 must lie in [0, 1), got nan."),
        ("weight_decay", -1e-4, "config.weight_decay must be zero or a positive number, got -0.0001."),
        ("div_factor", 0.0, "config.div_factor must be a positive number, got 0.0."),
        ("final_div_factor", "big", "config.final_div_factor must be a positive number, got 'big'."),
        ("cutout_size", -3, "config.cutout_size must be a non-negative integer, got -3."),
        ("crop_padding", 2.5, "config.crop_padding must be a non-negative integer, got 2.5."),
        ("prefetch", 0, "config.prefetch must be a positive integer, got 0."),
        ("epochs", True, "config.epochs must be a positive integer, got True."),
        ("max_lr", -0.1, "config.max_lr must be a positive number or 'auto', got -0.1."),
        ("max_lr", "fast", "config.max_lr must be a positive number or 'auto', got 'fast'."),
        ("name", "runs/a", "config.name starts the run directory's name, so it must be a non-empty name without "
                           "'/', got 'runs/a'."),
        ("name", " ", "config.name starts the run directory's name, so it must be a non-empty name without '/', "
                      "got ' '."),
        ("model", 18, "config.model must be a name (a string), got 18."),
        ("optimizer", None, "config.optimizer must be a name (a string), got None."),
        ("augment", "False", "config.augment must be True or False, got 'False'."),
        ("nesterov", "no", "config.nesterov must be True or False, got 'no'."),
        ("tensorboard", 0, "config.tensorboard must be True or False, got 0."),
        ("tfds_data_dir", 5, "config.tfds_data_dir must be a path or None, got 5."),
    ],
)
def test_validate_config_rejects_values_that_cannot_work(key, value, message):
    config = load_config_file(ROOT / "configs" / "default.py")
    config[key] = value
    with pytest.raises(ValueError) as raised:
        train_lib.validate_config(config)
    assert str(raised.value) == message


def test_validate_config_accepts_the_ends_of_each_range():
    config = load_config_file(ROOT / "configs" / "default.py")
    config.update(cutout_prob=1.0, pct_start=0.0, label_smoothing=0.0, momentum=0.0, weight_decay=0.0,
                  cutout_size=0, crop_padding=0)
    train_lib.validate_config(config)


def test_a_data_dir_given_as_a_path_object_is_recorded_as_its_path(tmp_path):
    # to_json_best_effort had written it as "unserializable object: <path>", made absolute against
    # the working directory: a config.json that explain.py and --resume could not follow.
    config = load_config_file(ROOT / "configs" / "default.py")
    config.data_dir = tmp_path / "cifar"
    train_lib.validate_config(config)
    assert rundir.config_record(config)["data_dir"] == str(tmp_path / "cifar")


@pytest.mark.parametrize("name", ["default", "smoke", "learning_check"])
def test_every_config_file_is_valid(name):
    train_lib.validate_config(load_config_file(ROOT / "configs" / f"{name}.py"))


def test_the_known_keys_are_the_default_configs():
    config = load_config_file(ROOT / "configs" / "default.py")
    assert sorted(config.keys()) == sorted([*CONFIG_KEYS, "lr_finder"])
    assert sorted(config.lr_finder.keys()) == sorted(LR_FINDER_KEYS)


@pytest.mark.parametrize(
    "body, message",
    [
        # A config written from scratch: each key it lacks would have been a traceback mid-run.
        ("c = ml_collections.ConfigDict(); c.epochs = 1; c.width = 4",
         "lacks the keys 'name', 'data_dir', "),
        # A misspelt key: it would have been silently ignored, training with the default learning rate.
        ("c = default.get_config(); c.max_learning_rate = 0.1",
         "has an unknown key 'max_learning_rate'; known keys: anneal_strategy, augment, "),
        ("c = default.get_config(); del c['seed']",
         "lacks the key 'seed'; start from configs/default.py's get_config() and change what differs."),
        ("c = [1, 2]", "returned a list, not a ConfigDict."),
        ("c = 3", "returned an int, not a ConfigDict."),
    ],
)
def test_cli_config_file_with_missing_or_unknown_keys(body, message, tmp_path, capsys):
    config_file = tmp_path / "mine.py"
    config_file.write_text(f"import ml_collections\nfrom configs import default\n\n\ndef get_config():\n"
                           f"    {body}\n    return c\n")
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--config", config_file], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_cli_config_file_that_is_a_folder(tmp_path, capsys):
    # Had been "Config file 'configs' does not exist." of a folder that does.
    (tmp_path / "configs").mkdir()
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--config", tmp_path / "configs"], capsys)
    assert code == 1 and err == (f"error: Config file {str(tmp_path / 'configs')!r} is a folder; name a .py file "
                                 "with get_config() in it, such as configs/default.py.\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "body, message",
    [
        (None, "Config file {path!r} does not exist."),
        ("def get_config(:\n", "Config file {path!r} failed to load (SyntaxError: invalid syntax"),
        ("import not_a_module_anywhere\n", "Config file {path!r} failed to load (ModuleNotFoundError: No module named "
                                           "'not_a_module_anywhere')."),
        ("epochs = 3\n", "Config file {path!r} has no get_config() function."),
        ("def get_config():\n    return {}['model']\n", "get_config() of {path!r} failed (KeyError"),
    ],
)
def test_cli_config_file_that_cannot_be_read(body, message, tmp_path, capsys):
    config_file = tmp_path / "mine.py"
    if body is not None:
        config_file.write_text(body)
    code, _, err = run_cli(["--workdir", tmp_path / "runs", "--config", config_file], capsys)
    assert code == 1 and err.startswith("error: " + message.format(path=str(config_file)))
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.epochs", "Cannot parse '--config.epochs'; write overrides as --config.KEY=VALUE."),
        ("--confg.epochs=1", "Cannot parse '--confg.epochs=1'; write overrides as --config.KEY=VALUE."),
        ("--config.optim.lr=1", "Unknown config key 'optim.lr'."),
        ("--config.lr_finder.nope=1", "Unknown config key 'lr_finder.nope'; known keys: diverge_th, end_lr, "),
    ],
)
def test_cli_override_that_cannot_be_parsed(override, message, tmp_path, capsys):
    code, _, err = run_cli(["--workdir", tmp_path / "runs", *TINY, override], capsys)
    assert code == 1 and err.startswith("error: " + message) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_run_config_that_is_not_json_is_named(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"epochs":')
    code, _, err = run_cli(["--workdir", tmp_path, "--resume", run_dir], capsys)
    assert code == 1 and err == (f"error: Cannot read the run config {str(run_dir / 'config.json')!r} "
                                 "(Expecting value: line 1 column 11 (char 10)).\n")
    assert (run_dir / "config.json").read_text() == '{"epochs":'  # left as it was


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda saved: saved.pop("data_dir"), "lacks the key 'data_dir'; train.py writes every key"),
        (lambda saved: saved.update(widht=8), "has an unknown key 'widht'"),
    ],
)
def test_an_edited_run_config_is_refused(edit, message, tmp_path):
    saved = load_config_file(ROOT / "configs" / "smoke.py").to_dict()
    edit(saved)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=message):
        config_from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a JSON object of config keys"):
        config_from_json(tmp_path / "config.json")


def test_learning_check_is_the_default_recipe_at_the_issues_size():
    default = load_config_file(ROOT / "configs" / "default.py").to_dict()
    check = load_config_file(ROOT / "configs" / "learning_check.py").to_dict()
    changed = {key for key in default if check[key] != default[key]}
    assert changed <= {"name", "data_dir", "width", "epochs", "batch_size"}
    assert (check["width"], check["epochs"], check["batch_size"]) == (16, 15, 128)


@pytest.mark.parametrize("workers", [0, 2], ids=["at once", "on worker threads"])
def test_a_step_compiled_ahead_for_the_abstract_state_steps_as_the_jitted_one(workers, monkeypatch):
    # Worker threads compile on hosts of 4 cores or more; this machine may have fewer.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(workers or 1) as pool:
        monkeypatch.setattr(train_lib, "_COMPILER", pool if workers else None)
        model, mesh = models.ResNet18(width=2), train_lib.make_mesh()
        tx = optax.sgd(0.1, momentum=0.9)
        images, labels, _, _ = synthetic_arrays(8, 0, seed=1)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        step = train_lib.make_train_step(model, mesh, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
        compiled = train_lib.compile_ahead(
            step, train_lib.abstract_train_state(model, tx, mesh),
            jax.ShapeDtypeStruct(images.shape, jnp.uint8, sharding=rows),
            jax.ShapeDtypeStruct(labels.shape, jnp.int32, sharding=rows)).result()
    ahead, metrics_ahead = compiled(train_lib.create_train_state(model, jax.random.key(0), tx, mesh),
                                    *train_lib.shard_batch((images, labels), mesh))
    jitted, metrics = step(train_lib.create_train_state(model, jax.random.key(0), tx, mesh),
                           *train_lib.shard_batch((images, labels), mesh))
    jax.tree_util.tree_map(np.testing.assert_array_equal, (ahead.params, metrics_ahead), (jitted.params, metrics))
    with pytest.raises((TypeError, ValueError)):  # it takes only the shapes it was compiled for, never compiling again
        compiled(ahead, *train_lib.shard_batch((images[:4], labels[:4]), mesh))


def test_a_run_compiles_its_train_and_eval_steps_once_and_few_programs_in_all(official_folder, tmp_path, capsys):
    # 100 training images at batch 32: three full batches and a dropped partial one; 30 test images at
    # batch 16: a padded last batch. Two epochs: the second starts from the first's state.
    compiled = []

    class Compilations(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiled.append(message.split()[1])

    handler = Compilations()
    logger = logging.getLogger("jax")
    jax.clear_caches()  # as a fresh process starts, whatever the suite compiled before
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            code, _, err = run_cli(["--workdir", tmp_path, *TINY, "--config.epochs=2", "--config.tensorboard=True",
                                    f"--config.data_dir={str(official_folder)!r}"], capsys)
    finally:
        logger.removeHandler(handler)
    assert code == 0, err
    assert compiled.count("jit(step)") == 1 and compiled.count("jit(predict)") == 1, compiled
    assert len(compiled) <= 12, " ".join(compiled)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcam import models


@pytest.mark.parametrize("factory, expected", [(models.ResNet18, 11_173_962), (models.ResNet34, 21_282_122)])
def test_parameter_counts(factory, expected):
    variables = jax.eval_shape(lambda: models.init_variables(factory(), jax.random.key(0)))
    assert models.count_params(variables["params"]) == expected


def test_layout_names_and_stage_shapes():
    model = models.ResNet18(width=8)
    variables = models.init_variables(model, jax.random.key(0))
    params = variables["params"]
    assert set(params) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"}
    assert set(params["layer2"]["0"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut"}
    assert "shortcut" not in params["layer1"]["0"]
    assert params["layer2"]["0"]["shortcut"]["0"]["kernel"].shape == (1, 1, 8, 16)
    _, state = model.apply(variables, jnp.zeros((2, 32, 32, 3)), mutable=["intermediates"])
    shapes = {name: state["intermediates"][name]["output"][0].shape for name in models.STAGES}
    assert shapes == {"layer1": (2, 32, 32, 8), "layer2": (2, 16, 16, 16), "layer3": (2, 8, 8, 32), "layer4": (2, 4, 4, 64)}


def test_init_compiled_at_lower_optimization_gives_the_same_variables():
    # init_variables compiles with INIT_COMPILER_OPTIONS to save compile time; seeded results
    # (learning checks, resume) rely on it giving exactly what the default compilation gives.
    model = models.ResNet18(width=4)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    default = jax.jit(lambda rng: model.init(rng, x, train=False))(jax.random.key(1))
    ours = models.init_variables(model, jax.random.key(1))
    for collection in ("params", "batch_stats"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, ours[collection], default[collection])


def test_init_of_a_model_with_list_fields_matches_the_tuple_one():
    # Flax's examples write stage sizes as a list; the module keeps them as a tuple, so it stays
    # hashable (init_variables' cache, and jit's static arguments in cam.compute).
    listed = models.init_variables(models.ResNet([2, 2, 2, 2], width=4), jax.random.key(1))
    tupled = models.init_variables(models.ResNet18(width=4), jax.random.key(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, listed, tupled)


def test_the_model_refuses_pixels_and_nchw_images():
    model = models.ResNet18(width=4)
    variables = models.init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match="Images must be normalized float arrays .*, got dtype uint8; convert"):
        model.apply(variables, np.zeros((2, 32, 32, 3), np.uint8), train=False)
    with pytest.raises(ValueError, match=r"Images must have shape \(N, H, W, 3\) NHWC, got \(2, 3, 32, 32\)\."):
        model.apply(variables, np.zeros((2, 3, 32, 32), np.float32), train=False)
    with pytest.raises(ValueError, match=r"got \(32, 32, 3\)\."):
        jax.jit(lambda x: model.apply(variables, x, train=False))(jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)\."):
        model.apply(variables, np.zeros((3, 32, 32), np.float32), train=False)
    assert model.apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False).shape == (2, 10)


def test_check_variables_names_what_does_not_fit():
    model = models.ResNet18(width=4)
    variables = models.init_variables(model, jax.random.key(0))
    models.check_variables(model, variables)
    fit = "The variables do not fit ResNet{} at width {} with {} classes: "
    cases = [
        (models.ResNet34(width=4), fit.format(34, 4, 10) + "'params/layer1/2/bn1/bias' is missing "
                                   r"\(variables of a model of another depth\?\)."),
        (models.ResNet18(width=8), fit.format(18, 8, 10) + r"'params/bn1/bias' has shape \(4,\), "
                                   r"the model's has \(8,\) \(variables of a model of another width"),
        (models.ResNet18(num_classes=100, width=4), fit.format(18, 4, 100) + "'params/linear/bias' has shape"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=message):
            models.check_variables(other, variables)
    with pytest.raises(ValueError, match=r"'params/extra/kernel' is unexpected"):
        models.check_variables(model, {**variables, "params": {**variables["params"], "extra": {"kernel": np.zeros(1)}}})
    with pytest.raises(ValueError, match=r"with 'params' and 'batch_stats' .*; got a list."):
        models.check_variables(model, [variables])
    with pytest.raises(ValueError, match=r"with 'params' and 'batch_stats' .*; got an int."):
        models.check_variables(model, 3)
    with pytest.raises(ValueError, match=r"with 'params' and 'batch_stats' .*; got None.$"):  # not "a NoneType"
        models.check_variables(model, None)


def test_stride2_padding_is_symmetric_like_pytorch():
    # A 3x3 conv with stride 2 and padding 1 on a 4x4 input reads rows -1..1 for output 0.
    conv = models._conv(1, 3, 2, "c", jnp.float32)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks the top-left tap
    y = conv.apply({"params": {"kernel": kernel}}, x)
    # Output (i, j) reads input (2i - 1, 2j - 1): zero padding at the border, then x[1,1].
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[0, 0], [0, 5]])


def test_torch_state_dict_round_trip():
    variables = models.init_variables(models.ResNet18(width=4), jax.random.key(1))
    variables = jax.tree_util.tree_map(lambda x: x + np.random.default_rng(0).normal(size=x.shape).astype(np.float32), variables)
    state_dict = models.to_torch_state_dict(variables)
    assert state_dict["conv1.weight"].shape == (4, 3, 3, 3)
    assert state_dict["layer2.0.shortcut.0.weight"].shape == (8, 4, 1, 1)
    assert state_dict["layer2.0.shortcut.1.running_var"].shape == (8,)
    assert state_dict["linear.weight"].shape == (10, 32)
    assert "bn1.num_batches_tracked" in state_dict
    # Writable, so that torch.from_numpy (as the docstring suggests) takes them without a warning.
    assert all(v.flags.writeable and v.flags.c_contiguous for v in state_dict.values())
    back = models.from_torch_state_dict(state_dict, width=4, depth=18)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_from_torch_state_dict_rejects_a_mismatch():
    state_dict = models.to_torch_state_dict(models.init_variables(models.ResNet18(width=4), jax.random.key(1)))
    with pytest.raises(ValueError, match=r"does not match ResNet34 .* \(its blocks per stage, \(2, 2, 2, 2\), are a "
                                         r"ResNet18's: pass depth=18\)\.$"):
        models.from_torch_state_dict(state_dict, width=4, depth=34)
    resnet34 = models.to_torch_state_dict(models.init_variables(models.ResNet34(width=4), jax.random.key(1)))
    with pytest.raises(ValueError, match=r"\(3, 4, 6, 3\), are a ResNet34's: pass depth=34\)\.$"):
        models.from_torch_state_dict(resnet34, width=4, depth=18)
    # torchvision's ImageNet ResNet18 is what users reach for first; say that it is another network.
    torchvision_names = {k.replace("linear.", "fc.").replace(".shortcut.", ".downsample."): v for k, v in state_dict.items()}
    with pytest.raises(ValueError, match=r"unexpected \['fc.bias', .*\(fc and downsample are the names of torchvision's "
                                         r"ImageNet ResNet, another architecture"):
        models.from_torch_state_dict(torchvision_names, width=4)
    with pytest.raises(ValueError, match=r"width-4 model \(conv1.weight has 4 output channels\), not width 8; pass width=4"):
        models.from_torch_state_dict(state_dict, width=8, depth=18)
    # Errors name the PyTorch entries and shapes the user passed, not the converted Flax ones.
    with pytest.raises(ValueError, match=r"'layer1.0.conv2.weight' has shape \(4, 4, 3, 1\), expected \(4, 4, 3, 3\)"):
        models.from_torch_state_dict({**state_dict, "layer1.0.conv2.weight": np.zeros((4, 4, 3, 1))}, width=4)
    with pytest.raises(ValueError, match=r"missing \['linear.bias'\], unexpected \['linear.b'\]"):
        state_dict_renamed = {("linear.b" if k == "linear.bias" else k): v for k, v in state_dict.items()}
        models.from_torch_state_dict(state_dict_renamed, width=4)
    with pytest.raises(ValueError, match="'bn1.running_var' has NaN or infinite values"):
        models.from_torch_state_dict({**state_dict, "bn1.running_var": np.full(4, np.nan)}, width=4)
    with pytest.raises(ValueError, match="takes a model's variables, a mapping with 'params' and 'batch_stats'"):
        models.to_torch_state_dict({"params": {}})


def test_from_torch_state_dict_reads_what_pytorch_users_have():
    torch = pytest.importorskip("torch")
    variables = models.init_variables(models.ResNet18(width=4), jax.random.key(1))
    state_dict = {k: torch.from_numpy(v) for k, v in models.to_torch_state_dict(variables).items()}
    # Tensors straight from model.state_dict(), also wrapped in nn.DataParallel and torch.compile.
    for given in (state_dict, {f"module.{k}": v for k, v in state_dict.items()},
                  {f"_orig_mod.module.{k}": v for k, v in state_dict.items()}):
        back = models.from_torch_state_dict(given, width=4)
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    # A bfloat16 model (numpy cannot read bfloat16 tensors): the weights rounded to bfloat16.
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state_dict.items()}
    back = models.from_torch_state_dict(half, width=4)
    np.testing.assert_array_equal(back["params"]["conv1"]["kernel"],
                                  np.asarray(variables["params"]["conv1"]["kernel"].astype(jnp.bfloat16), np.float32))


def test_from_torch_state_dict_refuses_a_whole_training_checkpoint():
    state_dict = models.to_torch_state_dict(models.init_variables(models.ResNet18(width=4), jax.random.key(1)))
    message = (r"State dict entry 'model' is of type dict, not an array \(a whole training checkpoint\? "
               r"pass the model's state dict inside it, such as checkpoint\['model'\]\)")
    with pytest.raises(ValueError, match=message):
        models.from_torch_state_dict({"model": state_dict, "epoch": 20}, width=4)
    with pytest.raises(ValueError, match="takes a PyTorch state dict, a non-empty mapping of names to arrays"):
        models.from_torch_state_dict({}, width=4)


def test_forward_matches_pytorch_reference():
    torch = pytest.importorskip("torch")
    from bench.torch_resnet import ResNet18 as TorchResNet18

    torch.manual_seed(0)
    reference = TorchResNet18(width=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    variables = models.from_torch_state_dict(reference.state_dict(), width=8)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ours = models.ResNet18(width=8)
    reference.eval()
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(ours.apply(variables, x, train=False), expected, rtol=1e-4, atol=1e-4)
    # Training mode: normalized with the batch statistics.
    reference.train()
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    logits, updates = ours.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    # Every running mean and variance, with PyTorch's momentum 0.1 and its unbiased variance
    # (n / (n - 1): 64/63 at layer4 of these 4 images, which a biased update misses by 1.6%).
    updated = models.to_torch_state_dict({"params": variables["params"], **updates})
    statistics = [name for name in updated if name.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * 20  # the stem, two per block and three shortcuts
    for name in statistics:
        np.testing.assert_allclose(updated[name], reference.state_dict()[name].numpy(), rtol=2e-5, atol=1e-6,
                                   err_msg=name)


def test_summary_lists_layers_in_order_with_totals():
    text = models.summary(models.ResNet18())
    lines = text.splitlines()
    assert lines[2].startswith("conv1 (Conv)") and "[-1, 32, 32, 64]" in lines[2] and "1,728" in lines[2]
    assert any(l.startswith("layer4.1.conv2 (Conv)") and "[-1, 4, 4, 512]" in l for l in lines)
    assert "Total params: 11,173,962" in text
    # 0 had printed a table of (-1, 0, 0, C) feature maps.
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 0."):
        models.summary(models.ResNet18(width=4), image_size=0)
    with pytest.raises(ValueError, match="image_size must be a positive integer, got '32'."):
        models.summary(models.ResNet18(width=4), image_size="32")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'"):
        models.create_model("resnet50")
    with pytest.raises(ValueError, match="Unknown model None; choose one of resnet18, resnet34."):
        models.create_model(None)


@pytest.mark.parametrize("width", [0, -3, 2.5, "a"])
def test_create_model_refuses_a_width_that_is_not_a_positive_integer(width):
    with pytest.raises(ValueError, match=f"ResNet width must be a positive integer, got {width!r}."):
        models.create_model("resnet34", width=width)


def test_from_torch_state_dict_refuses_an_unknown_depth():
    with pytest.raises(ValueError, match=r"Unknown ResNet depth 50; choose one of \[18, 34\]."):
        models.from_torch_state_dict({"conv1.weight": np.zeros((4, 3, 3, 3))}, width=4, depth=50)
    with pytest.raises(ValueError, match=r"Unknown ResNet depth '18'; choose one of \[18, 34\]."):
        models.from_torch_state_dict({"conv1.weight": np.zeros((4, 3, 3, 3))}, width=4, depth="18")


@pytest.mark.parametrize("width", ["4", 4.0, 0])
def test_from_torch_state_dict_refuses_a_width_that_is_not_a_positive_integer(width):
    with pytest.raises(ValueError, match=f"width must be a positive integer, got {width!r}."):
        models.from_torch_state_dict({"conv1.weight": np.zeros((4, 3, 3, 3))}, width=width)


@pytest.mark.parametrize("kwargs, message", [(dict(width=0), "width must be a positive integer, got 0"),
                                             (dict(num_classes=2.5), "num_classes must be a positive integer, got 2.5")])
def test_bad_model_sizes_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.ResNet18(**kwargs)


def test_stage_features_names_what_it_cannot_count():
    assert [models.stage_features(16, stage) for stage in models.STAGES] == [16, 32, 64, 128]
    # "tuple.index(x): x not in tuple"
    with pytest.raises(ValueError, match=r"^Unknown layer 'layer5'; choose from layer1, layer2, layer3, layer4.$"):
        models.stage_features(64, "layer5")
    with pytest.raises(ValueError, match=r"^width must be a positive integer, got '64'.$"):
        models.stage_features("64", "layer3")

"""CIFAR ResNets (the "kuangliu" layout) in Flax linen, with PyTorch weight conversion.

Layout: 3x3 stride-1 stem (`conv1`, `bn1`), no max-pool, four stages `layer1..layer4` of
BasicBlocks at 64/128/256/512 channels (times `width / 64`) and 32/16/8/4 px, global average
pool, linear head `linear`. Parameter names mirror the PyTorch reference
(`layer2/0/shortcut/0` is the 1x1 conv of `layer2.0.shortcut.0`), so state dicts convert
both ways by name.

Every stage output is sown into the `intermediates` collection (`intermediates/layer3/output`)
and passed through `perturb`, so Grad-CAM can take gradients with respect to it (`jaxcam.cam`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcam._checks import check_positive_integer, is_integer, kind_of

STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_OUTPUT = "output"
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def check_stage(name: Any) -> None:
    """ValueError unless `name` is one of STAGES."""
    if name not in STAGES:
        raise ValueError(f"Unknown layer {name!r}; choose from {', '.join(STAGES)}.")


def stage_features(width: int, stage: str) -> int:
    """Channels of a stage's output: `width` for layer1, doubling at each stage after it."""
    check_stage(stage)  # tuple.index's own words: "x not in tuple"
    check_positive_integer(width, "width")
    return width * 2 ** STAGES.index(stage)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d(momentum=0.1, eps=1e-5) over the last axis of (N, H, W, C).

    A batch is normalized with its biased variance, and the running variance is updated with
    the unbiased one, times n / (n - 1) for the n values per channel over all devices of
    `axis_name`, both as in PyTorch. Flax's nn.BatchNorm, used before, adds the biased one,
    1.6% smaller than PyTorch's at layer4 of a batch of 4 (n = 64).
    Variables are named as Flax's (params `scale`/`bias`, batch_stats `mean`/`var`), so
    checkpoints and the PyTorch conversion are unchanged. Statistics are reduced in float32
    whatever the compute dtype.
    """

    use_running_average: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    momentum: float = 0.9  # Flax's decay of the old value: PyTorch's momentum 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            # The square before the means, in nn.BatchNorm's order: XLA's fusion follows the trace
            # order, and this order keeps the gradients bitwise those of nn.BatchNorm.
            square = jax.lax.square(x32)
            mean, mean_square = x32.mean(axes), square.mean(axes)
            count = int(np.prod(x.shape[:-1]))
            if self.axis_name is not None and not self.is_initializing():
                # One collective for both moments.
                mean, mean_square = jax.lax.pmean(jnp.stack([mean, mean_square]), self.axis_name)
                count *= jax.lax.axis_size(self.axis_name)
            var = jnp.maximum(0.0, mean_square - jax.lax.square(mean))  # E[x^2] - E[x]^2 may round below 0
            if not self.is_initializing():
                # One value per channel has no unbiased variance (PyTorch refuses it); keep it 0.
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    # Explicit symmetric padding like PyTorch's `padding=1`; "SAME" would pad (0, 1) at
    # stride 2 and shift every feature map by a pixel relative to the reference.
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=nn.initializers.kaiming_normal(),
        dtype=dtype,
        name=name,
    )


class Shortcut(nn.Module):
    """Projection shortcut: `0` is the 1x1 conv and `1` the BatchNorm, as in `nn.Sequential`."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, 1, self.stride, "0", self.dtype)(x)
        return BatchNorm(
            use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype, name="1"
        )(x)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); (N, H, W, C) -> (N, H/s, W/s, F)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(
            BatchNorm, use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype
        )
        out = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
        out = nn.relu(norm(name="bn1")(out))
        out = _conv(self.features, 3, 1, "conv2", self.dtype)(out)
        out = norm(name="bn2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Shortcut(self.features, self.stride, self.dtype, self.bn_axis_name, name="shortcut")(
                x, train
            )
        return nn.relu(out + x)


class Stage(nn.Module):
    """A sequence of BasicBlocks named `0`, `1`, ... like `nn.Sequential`."""

    features: int
    num_blocks: int
    stride: int
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            x = BasicBlock(self.features, stride, self.dtype, self.bn_axis_name, name=str(i))(x, train)
        # The stage output, for Grad-CAM: a zero-valued `perturbations` variable (present only
        # when that collection is passed to `apply`) whose gradient is the gradient of the
        # output, and the output itself in `intermediates`. Both live under this stage's name
        # (`intermediates/layer3/output`) because a variable may not share a submodule's name.
        x = self.perturb(STAGE_OUTPUT, x)
        self.sow("intermediates", STAGE_OUTPUT, x)
        return x


class ResNet(nn.Module):
    """CIFAR ResNet. Input: normalized float images (N, H, W, 3) NHWC (32x32 for CIFAR); output: logits (N, classes).

    `width` is the stem/first-stage channel count (64 in the reference); `dtype` is the
    compute dtype (parameters stay float32); `bn_axis_name` makes BatchNorm average its batch
    statistics over that mapped axis (set by the data-parallel train step).
    """

    stage_sizes: Sequence[int]
    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    def __post_init__(self) -> None:
        # Checked at construction: a bad size would otherwise surface deep inside init.
        for name in ("width", "num_classes"):
            check_positive_integer(getattr(self, name), f"ResNet {name}")
        # Stage sizes given as a list (as Flax's examples write them) would make the module
        # unhashable, and jit takes it as a static argument (cam.compute) and caches key on it.
        object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (N, num_classes) float32 for normalized float images x (N, H, W, 3)."""
        # uint8 pixels would be cast and classified without a word; checked at trace time, so free.
        check_image_batch(x.shape, x.dtype)
        x = x.astype(self.dtype)
        x = _conv(self.width, 3, 1, "conv1", self.dtype)(x)
        x = BatchNorm(
            use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1"
        )(x)
        x = nn.relu(x)
        for i, (name, blocks) in enumerate(zip(STAGES, self.stage_sizes)):
            x = Stage(stage_features(self.width, name), blocks, 1 if i == 0 else 2, self.dtype, self.bn_axis_name,
                      name=name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
        return x.astype(jnp.float32)


def check_image_batch(shape: Sequence[int], dtype: Any) -> None:
    """ValueError unless `shape` and `dtype` are those of normalized float images (N, H, W, 3)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Images must be normalized float arrays (N, H, W, 3), got dtype {dtype}; "
            "convert uint8 images with jaxcam.data.normalize first."
        )
    if len(shape) != 4 or shape[-1] != 3:
        shape = tuple(shape)
        raise ValueError(f"Images must have shape (N, H, W, 3) NHWC, got {shape}.")


def ResNet18(num_classes: int = 10, width: int = 64, **kwargs: Any) -> ResNet:
    """ResNet18: 11,173,962 trainable parameters at width 64 and 10 classes."""
    return ResNet(DEPTHS[18], num_classes=num_classes, width=width, **kwargs)


def ResNet34(num_classes: int = 10, width: int = 64, **kwargs: Any) -> ResNet:
    """ResNet34: 21,282,122 trainable parameters at width 64 and 10 classes."""
    return ResNet(DEPTHS[34], num_classes=num_classes, width=width, **kwargs)


MODELS = {"resnet18": ResNet18, "resnet34": ResNet34}


def check_model_name(name: Any) -> None:
    """ValueError unless `name` names one of MODELS (in any case)."""
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")


def create_model(name: str, num_classes: int = 10, width: int = 64, **kwargs: Any) -> ResNet:
    """Build a model by name ("resnet18" or "resnet34"); unknown names raise ValueError."""
    check_model_name(name)
    return MODELS[name.lower()](num_classes=num_classes, width=width, **kwargs)


# XLA:CPU compiles at LLVM -O3 by default, which spends 8-17 s on the unrolled threefry hashes
# of the ~20 initializers (the most at small widths); -O2 compiles the same init in 3-5 s and
# gives bitwise-identical variables (models_test checks it), so seeded results do not move.
# The init runs once, so its own run time does not matter.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 2}}


@functools.lru_cache(maxsize=16)
def _jitted_init(model: ResNet, image_size: int, backend: str | None) -> Any:
    """jit(rng -> variables) for `model`, compiled with the `backend`'s INIT_COMPILER_OPTIONS (None:
    none), made once per model (modules compare by value), so a second init of the same model (the
    LR range test, then training) reuses the compiled program."""

    def init(rng: jax.Array) -> dict:
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    # Jitted: one compilation instead of one per initializer op (eager init took ~17 s on 2 CPU cores).
    return jax.jit(init, compiler_options=INIT_COMPILER_OPTIONS.get(backend, {}))


def init_variables(model: ResNet, rng: jax.Array, image_size: int = 32) -> dict:
    """{'params', 'batch_stats'} for `model`, without the per-call `perturbations`/`intermediates`."""
    check_positive_integer(image_size, "image_size")  # 0 had given a summary of empty feature maps
    # Under a trace (jax.eval_shape for shapes) the jit is nested, and JAX takes compiler options
    # only at the top level.
    backend = None if isinstance(rng, jax.core.Tracer) else jax.default_backend()
    return _jitted_init(model, image_size, backend)(rng)


@functools.lru_cache(maxsize=16)
def _variable_shapes(model: ResNet) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(collection, *path): shape} of `model`'s variables, without computing them."""
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return {key: tuple(leaf.shape) for key, leaf in _flax_variables(template).items()}


def check_variables(model: Any, variables: Any, what: str = "The variables") -> None:
    """ValueError unless `variables` ({'params', 'batch_stats'}) fit `model`, naming the first
    entry that does not (variables of another depth, width or class count would otherwise fail
    deep inside Flax, or, for a missing 'batch_stats', as a bare KeyError). `what` names the
    variables in the message. Modules other than a ResNet are taken as they are."""
    if not isinstance(model, ResNet):
        return
    if not _is_variables(variables):
        given = sorted(map(str, variables)) if isinstance(variables, Mapping) else kind_of(variables)
        raise ValueError(
            "Model variables must be a mapping with 'params' and 'batch_stats' (the BatchNorm running "
            f"statistics), as init_variables and checkpoint.load_variables return them; got {given}."
        )
    expected = _variable_shapes(model)
    given = {key: tuple(np.shape(leaf)) for key, leaf in _flax_variables(variables).items()}
    depth = _depth_of(model.stage_sizes)
    name = f"ResNet{depth}" if depth else f"the ResNet with stages {tuple(model.stage_sizes)}"
    subject = f"{what} do not fit {name} at width {model.width} with {model.num_classes} classes"
    params_first = lambda key: (key[0] != "params", key)  # noqa: E731
    missing = sorted(expected.keys() - given.keys(), key=params_first)
    extra = sorted(given.keys() - expected.keys(), key=params_first)
    if missing or extra:
        first = f"'{'/'.join(missing[0])}' is missing" if missing else f"'{'/'.join(extra[0])}' is unexpected"
        raise ValueError(f"{subject}: {first} (variables of a model of another depth?).")
    for key, shape in sorted(expected.items(), key=lambda item: params_first(item[0])):
        if given[key] != shape:
            raise ValueError(f"{subject}: '{'/'.join(key)}' has shape {given[key]}, the model's has {shape} "
                             "(variables of a model of another width or class count?).")


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def summary(model: ResNet, image_size: int = 32) -> str:
    """A torchsummary-like table in call order: layer, output shape, own parameters, totals."""
    check_positive_integer(image_size, "image_size")
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_size))
    flat_params = flax_traverse(variables["params"])
    rows: list[list[Any]] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        row = [".".join(context.module.path) or type(context.module).__name__, None, type(context.module).__name__]
        rows.append(row)  # appended before the call, so parents precede their layers
        out = next_fun(*args, **kwargs)
        row[1] = out.shape
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    lines = [f"{'Layer (type)':<40}{'Output Shape':>18}{'Param #':>12}", "=" * 70]
    for name, shape, kind in rows[1:]:  # rows[0] is the whole model
        path = tuple(name.split("."))
        own = sum(int(np.prod(p.shape)) for k, p in flat_params.items() if k[:-1] == path)
        lines.append(
            f"{f'{name} ({kind})':<40}{str([-1, *shape[1:]]):>18}{(f'{own:,}' if own else '-'):>12}"
        )
    total = count_params(variables["params"])
    lines += [
        "=" * 70,
        f"Total params: {total:,}",
        f"Trainable params: {total:,}",
        f"Non-trainable (BatchNorm running statistics): {count_params(variables['batch_stats']):,}",
    ]
    return "\n".join(lines)


def flax_traverse(tree: Mapping) -> dict[tuple[str, ...], Any]:
    """Flatten nested mappings to {path tuple: leaf}."""
    out: dict[tuple[str, ...], Any] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            out[prefix] = node

    walk(tree, ())
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _torch_name(key: tuple[str, ...]) -> str:
    """The reference PyTorch name of a Flax variable: ('params', 'conv1', 'kernel') -> conv1.weight."""
    collection, *module, leaf = key
    prefix = ".".join(module)
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}"  # mean, var
    return f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"  # kernel and scale are weights


def _torch_axes(ndim: int) -> tuple[int, ...]:
    """Axis order from a Flax to the PyTorch layout: conv kernel (kh, kw, I, O) -> weight
    (O, I, kh, kw), Linear kernel (I, O) -> weight (O, I); vectors stay."""
    return (3, 2, 0, 1) if ndim == 4 else (1, 0) if ndim == 2 else tuple(range(ndim))


def _is_variables(variables: Any) -> bool:
    """A mapping with the two collections the model keeps, 'params' and 'batch_stats'."""
    return isinstance(variables, Mapping) and {"params", "batch_stats"} <= variables.keys()


def _flax_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """{(collection, *path): leaf} over 'params' and 'batch_stats'."""
    return {(collection,) + path: leaf for collection in ("params", "batch_stats")
            for path, leaf in flax_traverse(variables[collection]).items()}


def from_torch_state_dict(state_dict: Mapping[str, Any], width: int = 64, depth: int = 18) -> dict:
    """PyTorch reference state dict (name -> array) to Flax `{'params', 'batch_stats'}`.

    Conv weights (O, I, kh, kw) become kernels (kh, kw, I, O), Linear (O, I) becomes (I, O),
    BatchNorm weight/bias/running_mean/running_var become scale/bias/mean/var;
    `num_batches_tracked` is dropped. Entries may be numpy arrays or PyTorch tensors (on any
    device, in any float dtype). The `module.` prefix of `nn.DataParallel` / DDP and the
    `_orig_mod.` prefix of `torch.compile` are removed. Names, shapes (both in PyTorch terms
    in errors) and finiteness are checked against the model.
    """
    if not is_integer(depth, 1) or depth not in DEPTHS:
        raise ValueError(f"Unknown ResNet depth {depth!r}; choose one of {sorted(DEPTHS)}.")
    check_positive_integer(width, "width")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("from_torch_state_dict takes a PyTorch state dict, a non-empty mapping of names to arrays.")
    state_dict = _without_wrapper_prefixes(state_dict)
    given = {name: _float32_array(name, tensor) for name, tensor in state_dict.items()
             if not name.endswith("num_batches_tracked")}
    if "conv1.weight" in given and given["conv1.weight"].shape[0] != width:
        channels = given["conv1.weight"].shape[0]
        raise ValueError(f"The state dict is of a width-{channels} model (conv1.weight has {channels} output "
                         f"channels), not width {width}; pass width={channels}.")
    num_classes = int(given["linear.weight"].shape[0]) if "linear.weight" in given else 10
    model = ResNet(DEPTHS[depth], num_classes=num_classes, width=width)
    shapes = _variable_shapes(model)
    expected = {_torch_name(key): key for key in shapes}
    missing, extra = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"State dict does not match ResNet{depth} at width {width}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}{_layout_hint(given, depth)}."
        )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, array in given.items():
        key = expected[name]
        axes = _torch_axes(len(shapes[key]))
        want = tuple(shapes[key][a] for a in axes)
        if array.shape != want:
            raise ValueError(f"State dict entry {name!r} has shape {array.shape}, expected {want} "
                             f"for ResNet{depth} at width {width}.")
        if not np.isfinite(array).all():
            raise ValueError(f"State dict entry {name!r} has NaN or infinite values.")
        flat[key] = array.transpose(np.argsort(axes))
    return _unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _depth_of(stage_sizes: Sequence[int]) -> int | None:
    """The depth in DEPTHS whose blocks per stage are `stage_sizes`, or None."""
    return next((d for d, sizes in DEPTHS.items() if tuple(sizes) == tuple(stage_sizes)), None)


def _layout_hint(names: Iterable[str], depth: int) -> str:
    """Why a state dict's names may not match: another depth, or torchvision's ImageNet ResNet."""
    names = list(names)
    if any(name.startswith("fc.") or ".downsample." in name for name in names):
        return (" (fc and downsample are the names of torchvision's ImageNet ResNet, another architecture with a 7x7 "
                "stem and a max-pool; jaxcam converts the CIFAR layout, with linear and shortcut)")
    blocks = tuple(1 + max((int(n.split(".")[1]) for n in names if n.startswith(f"{stage}.") and
                            n.split(".")[1].isdigit()), default=-1) for stage in STAGES)
    other = _depth_of(blocks)
    if other is None or other == depth:
        return ""
    return f" (its blocks per stage, {blocks}, are a ResNet{other}'s: pass depth={other})"


# Prefixes that wrappers add to every name: nn.DataParallel / DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict with each wrapper prefix that every name carries removed (they nest)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(name, str) and name.startswith(prefix) for name in state_dict):
                state_dict = {name[len(prefix):]: value for name, value in state_dict.items()}
                stripped = True
    return state_dict


def _float32_array(name: str, value: Any) -> np.ndarray:
    """A state dict entry as float32 numpy; PyTorch tensors are read without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()  # numpy cannot read CUDA tensors
        if value.is_floating_point():
            value = value.float()  # nor bfloat16 ones
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        hint = (f" (a whole training checkpoint? pass the model's state dict inside it, such as checkpoint[{name!r}])"
                if isinstance(value, Mapping) else "")
        raise ValueError(f"State dict entry {name!r} is of type {type(value).__name__}, not an array{hint}.") from None


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` to a PyTorch reference state dict of numpy arrays.

    Load it with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
    """
    if not _is_variables(variables):
        raise ValueError("to_torch_state_dict takes a model's variables, a mapping with 'params' and 'batch_stats'.")
    out: dict[str, np.ndarray] = {}
    for key, value in _flax_variables(variables).items():
        array = np.asarray(value, dtype=np.float32)
        name = _torch_name(key)
        # A copy: arrays read from JAX are read-only, and torch.from_numpy warns about those.
        out[name] = np.array(array.transpose(_torch_axes(array.ndim)), order="C")
        if key[0] == "batch_stats":
            out.setdefault(f"{name.rsplit('.', 1)[0]}.num_batches_tracked", np.zeros((), np.int64))
    return out

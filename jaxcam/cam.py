"""Class activation maps for jaxcam ResNets: one shared core, each method a short function.

The core runs the model once in eval mode with the `perturbations` collection supplied, so a
single VJP gives the gradient of each image's target logit (pre-softmax) with respect to
every requested stage output, while `intermediates` (Flax `sow`) returns the outputs
themselves. Targets are the predicted class (default), or one class index per image.

Post-processing follows pytorch-grad-cam 1.5.7: per layer ReLU, one per-image min-max to
[0, 1] as `(x - min) / (max(x - min) + 1e-7)`, bilinear (half-pixel, like cv2.resize)
resize to the input size; then across layers clip at 0, mean, and min-max again (also for a
single layer). Arrays here are NHWC: activations and gradients are (N, h, w, C).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam._checks import check_flag, check_positive_integer, is_integer, kind_of
from jaxcam.models import STAGE_OUTPUT, STAGES, check_image_batch, check_stage, check_variables

EPS = 1e-7


# ----------------------------------------------------------------------------- methods


def _of_activations_and_gradients(method: Callable[[jax.Array, jax.Array], jax.Array]):
    """`method` with its arguments checked at trace time (no cost in the compiled code):
    gradients of another size would be averaged into a map, and one image's (h, w, C) taken
    as a batch."""

    @functools.wraps(method)
    def checked(activations: jax.Array, gradients: jax.Array) -> jax.Array:
        if activations.ndim != 4 or gradients.shape != activations.shape:
            raise ValueError(f"{method.__name__} takes activations and gradients of one shape (N, h, w, C), "
                             f"got {activations.shape} and {gradients.shape}.")
        return method(activations, gradients)

    return checked


def _weighted_sum(activations: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_c weights[n, c] * A[n, :, :, c] -> (N, h, w)."""
    return jnp.einsum("nhwc,nc->nhw", activations, weights)


@_of_activations_and_gradients
def gradcam(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradient."""
    return _weighted_sum(activations, gradients.mean(axis=(1, 2)))


@_of_activations_and_gradients
def gradcam_plus_plus(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the exp-score closed form of pytorch-grad-cam."""
    g2 = gradients**2
    g3 = g2 * gradients
    sum_activations = activations.sum(axis=(1, 2))[:, None, None, :]
    alpha = g2 / (2 * g2 + sum_activations * g3 + 1e-6)
    alpha = jnp.where(gradients != 0, alpha, 0.0)
    weights = (jnp.maximum(gradients, 0) * alpha).sum(axis=(1, 2))
    return _weighted_sum(activations, weights)


@_of_activations_and_gradients
def hirescam(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed over channels."""
    return (gradients * activations).sum(axis=-1)


@_of_activations_and_gradients
def xgradcam(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the activation's share of its channel sum."""
    sum_activations = activations.sum(axis=(1, 2))[:, None, None, :]
    weights = (gradients * activations / (sum_activations + EPS)).sum(axis=(1, 2))
    return _weighted_sum(activations, weights)


@_of_activations_and_gradients
def layercam(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """LayerCAM (Jiang et al. 2021): positive gradients as per-location weights."""
    return (jnp.maximum(gradients, 0) * activations).sum(axis=-1)


def eigencam(activations: jax.Array, gradients: jax.Array | None = None) -> jax.Array:
    """EigenCAM (Muhammad & Yeasin 2020): projection on the first principal component.

    Per image, the (h*w, C) activations are centred over locations and projected on the first
    right-singular vector. The SVD's sign is arbitrary; we fix it so that the map correlates
    positively with the channel-summed activations (ties: positive). No gradients are used.
    """
    if activations.ndim != 4:
        raise ValueError(f"eigencam takes activations (N, h, w, C), got {activations.shape}.")
    n, h, w, c = activations.shape
    flat = activations.reshape(n, h * w, c)
    flat = flat - flat.mean(axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(flat, full_matrices=False)
    projection = jnp.einsum("npc,nc->np", flat, vt[:, 0, :])
    reference = activations.reshape(n, h * w, c).sum(-1)
    reference = reference - reference.mean(axis=1, keepdims=True)
    sign = jnp.where((projection * reference).sum(axis=1) < 0, -1.0, 1.0)
    return (projection * sign[:, None]).reshape(n, h, w)


def scorecam_from_scores(activations: jax.Array, scores: jax.Array) -> jax.Array:
    """Score-CAM (Wang et al. 2020): channel weights are softmax over channels of the target
    scores of the input masked by each upsampled, normalized channel; scores (N, C)."""
    if activations.ndim != 4 or scores.shape != (activations.shape[0], activations.shape[-1]):
        raise ValueError(f"scorecam_from_scores takes activations (N, h, w, C) and scores (N, C), got "
                         f"{activations.shape} and {scores.shape}.")
    return _weighted_sum(activations, jax.nn.softmax(scores, axis=-1))


GRADIENT_METHODS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "hirescam": hirescam,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "eigencam": eigencam,
}
METHODS = (*GRADIENT_METHODS, "scorecam")


# ----------------------------------------------------------------------------- post-processing


def _interpolation_matrix(out_size: int, in_size: int, align_corners: bool) -> np.ndarray:
    """(out, in) weights of 1-D linear interpolation; half-pixel centres clamp at the edges like cv2."""
    if align_corners:
        src = np.arange(out_size) * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0, in_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def resize_bilinear(maps: jax.Array, size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """Resize (N, h, w[, C]) maps to (N, H, W[, C]) bilinearly (half-pixel centres by default)."""
    if maps.ndim not in (3, 4):
        raise ValueError(f"resize_bilinear takes maps (N, h, w) or (N, h, w, C), got {maps.shape}.")
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(is_integer(v, 1) for v in size)):
        raise ValueError(f"resize_bilinear takes a size (H, W) of two positive integers, got {size!r}.")
    rows = jnp.asarray(_interpolation_matrix(size[0], maps.shape[1], align_corners))
    cols = jnp.asarray(_interpolation_matrix(size[1], maps.shape[2], align_corners))
    if maps.ndim == 3:
        return jnp.einsum("Hh,nhw,Ww->nHW", rows, maps, cols)
    return jnp.einsum("Hh,nhwc,Ww->nHWc", rows, maps, cols)


def minmax(maps: jax.Array) -> jax.Array:
    """Per-image `(x - min) / (max(x - min) + 1e-7)` over the spatial axes of (N, H, W)."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (maps.max(axis=(1, 2), keepdims=True) + EPS)


def combine_layers(per_layer: Sequence[jax.Array], size: tuple[int, int] | None) -> jax.Array:
    """ReLU, min-max, resize each (N, h, w) map to `size`; then clip, mean over layers, min-max."""
    if not per_layer:
        raise ValueError("combine_layers takes at least one map (N, h, w).")
    shapes = sorted({tuple(cam.shape) for cam in per_layer})
    if size is None and len(shapes) > 1:  # jnp.stack's words: "All input arrays must have the same shape"
        raise ValueError(f"combine_layers keeps the maps' sizes with size=None, so they must share one, got "
                         f"{' and '.join(map(str, shapes))}; pass the size to resize them to.")
    scaled = []
    for cam in per_layer:
        cam = minmax(jnp.maximum(cam, 0))
        if size is not None and cam.shape[1:] != tuple(size):
            cam = resize_bilinear(cam, size)
        scaled.append(cam)
    return minmax(jnp.maximum(jnp.stack(scaled, axis=1), 0).mean(axis=1))


# ----------------------------------------------------------------------------- the core


def check_layers(layer: str | Sequence[str]) -> tuple[str, ...]:
    """Stage names as a tuple without repeats (a repeat adds nothing to the mean of normalized
    maps); ValueError for an empty list or an unknown name."""
    if isinstance(layer, str):
        layers = (layer,)
    elif isinstance(layer, (list, tuple)):
        layers = tuple(dict.fromkeys(layer))
    else:
        raise ValueError(f"Name the layer as a string or a list of them, such as 'layer3', got {layer!r}.")
    if not layers:
        raise ValueError("Name at least one layer for the CAM.")
    for name in layers:
        check_stage(name)
    return layers


def check_method(method: str) -> None:
    """ValueError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise ValueError(f"Unknown CAM method {method!r}; choose one of {', '.join(METHODS)}.")


def check_float_images(images: Any) -> jax.Array:
    """Validate normalized float NHWC images (N, H, W, 3)."""
    if not hasattr(images, "dtype"):
        raise ValueError(f"Images must be a normalized float array (N, H, W, 3), got {kind_of(images)}.")
    check_image_batch(images.shape, images.dtype)
    if images.shape[0] == 0:
        raise ValueError("No images to explain (the batch is empty).")
    # A NaN or inf pixel makes every map of its image NaN: say so instead of returning them. In
    # numpy: an eager jnp check compiled two XLA programs of its own.
    finite = np.isfinite(np.asarray(images, np.float32)).all(axis=(1, 2, 3))
    if not finite.all():
        raise ValueError(
            f"Image {int(np.argmin(finite))} of the batch has NaN or infinite values; it cannot be explained."
        )
    return jnp.asarray(images, jnp.float32)


def _check_targets(targets: Any, n: int, num_classes: int) -> np.ndarray:
    """Targets as int32 (N,), -1 meaning the predicted class."""
    if targets is None:
        return np.full(n, -1, np.int32)
    targets = np.asarray(targets)
    # Checked before a scalar is broadcast, so that 2.7 is refused rather than read as class 2.
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"Target classes must be integers, got {targets.dtype} ({targets.ravel()[:3].tolist()}).")
    if targets.ndim == 0:
        targets = np.full(n, targets)
    if targets.shape != (n,):
        raise ValueError(f"Give one target class per image: {n} images but targets of shape {targets.shape}.")
    check_target_range(targets, num_classes)
    return targets.astype(np.int32)


def check_target_range(targets: np.ndarray, num_classes: int) -> None:
    """ValueError naming the first class index (N,) outside 0..num_classes-1 (a negative index
    would otherwise silently pick a class from the end)."""
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)][0]
        raise ValueError(f"Target class {int(bad)} is out of range for a model with {num_classes} classes.")


def activations_and_gradients(
    model: Any, variables: Any, images: jax.Array, targets: jax.Array, layers: Sequence[str]
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """One eval-mode forward and one VJP: (logits (N, K), targets (N,), activations, gradients).

    `targets` < 0 take the predicted class. Activations and gradients map each layer name
    to (N, h, w, C); the gradient is of each image's own target logit.
    """
    base = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    shapes = jax.eval_shape(
        lambda x: model.apply(base, x, train=False, mutable=["intermediates"])[1], images
    ).get("intermediates", {})
    missing = [s for s in STAGES if STAGE_OUTPUT not in shapes.get(s, {})]
    if missing:  # a module other than jaxcam's ResNet
        raise ValueError(f"{type(model).__name__} sows no {missing[0]!r} output; CAMs need a model that sows its "
                         f"stages {', '.join(STAGES)} as jaxcam.models.ResNet does.")
    perturbations = {s: {STAGE_OUTPUT: jnp.zeros(shapes[s][STAGE_OUTPUT][0].shape, jnp.float32)} for s in STAGES}

    def forward(perturbations):
        logits, state = model.apply(
            {**base, "perturbations": perturbations}, images, train=False, mutable=["intermediates"]
        )
        return logits, state["intermediates"]

    logits, backward, intermediates = jax.vjp(forward, perturbations, has_aux=True)
    targets = jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets)
    (grads,) = backward(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    activations = {name: intermediates[name][STAGE_OUTPUT][0].astype(jnp.float32) for name in layers}
    gradients = {name: grads[name][STAGE_OUTPUT].astype(jnp.float32) for name in layers}
    return logits, targets, activations, gradients


def scorecam_scores(
    model: Any, variables: Any, images: jax.Array, activations: jax.Array, targets: jax.Array, chunk: int = 256
) -> jax.Array:
    """Target logits of the images masked by each channel: (N, C).

    As in pytorch-grad-cam: channels are upsampled to the input size with align_corners=True,
    min-max normalized per channel with 1e-8, and multiply the (normalized) input.
    """
    n, height, width, _ = images.shape
    up = resize_bilinear(activations, (height, width), align_corners=True)  # (N, H, W, C)
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    masks = (up - lo) / (hi - lo + 1e-8)
    base = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def one_image(image, image_masks, target):
        masked = image[None] * jnp.moveaxis(image_masks, -1, 0)[..., None]  # (C, H, W, 3)
        logits = jax.lax.map(lambda x: model.apply(base, x[None], train=False)[0], masked, batch_size=chunk)
        return logits[:, target]

    return jax.lax.map(lambda args: one_image(*args), (images, masks, targets))


@functools.partial(jax.jit, static_argnames=("model", "layers", "method", "size"))
def _compute_batch(model, variables, images, targets, *, layers, method, size):
    logits, targets, activations, gradients = activations_and_gradients(model, variables, images, targets, layers)
    per_layer = []
    for name in layers:
        if method == "scorecam":
            scores = scorecam_scores(model, variables, images, activations[name], targets)
            per_layer.append(scorecam_from_scores(activations[name], scores))
        else:
            per_layer.append(GRADIENT_METHODS[method](activations[name], gradients[name]))
    if size is None:  # keep the finest chosen layer's resolution
        size = max((cam.shape[1:] for cam in per_layer), key=lambda s: s[0] * s[1])
    return combine_layers(per_layer, tuple(size)), logits, targets


def compute_with_outputs(
    model: Any,
    variables: Any,
    images: Any,
    *,
    layer: str | Sequence[str] = "layer3",
    targets: Any = None,
    method: str = "gradcam",
    resize: bool = True,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `compute`, also returning the logits (N, K) and the target classes used (N,)."""
    layers = check_layers(layer)
    check_method(method)
    check_flag(resize, "resize")
    check_positive_integer(batch_size, "batch_size")
    images = check_float_images(images)
    check_variables(model, variables)  # a ResNet's; other modules that sow the same stages are taken as they are
    if getattr(model, "dtype", jnp.float32) != jnp.float32:
        # A bfloat16 model (train.build on a GPU or TPU) would give maps up to about 0.025 off the
        # float32 reference; the parameters are float32, so explain in float32.
        model = model.clone(dtype=jnp.float32)
    # Variables replicated over several devices (a TrainState's after data-parallel training), or
    # images sharded over them, would make each CAM a program run on all of them; with an SVD in it
    # (EigenCAM) that program never finished on 2 host CPU devices. One device computes the maps.
    device = min(images.devices(), key=lambda d: d.id)
    images, variables = jax.device_put((images, variables), device)
    n, height, width, _ = images.shape
    num_classes = model.num_classes
    targets = _check_targets(targets, n, num_classes)
    size = (height, width) if resize else None
    maps, logits, used = [], [], []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        batch_targets = targets[start : start + batch_size]
        pad = batch_size - len(batch) if n > batch_size else 0  # fixed shapes: one compilation
        if pad:
            batch = jnp.concatenate([batch, jnp.zeros((pad, *batch.shape[1:]), batch.dtype)])
            batch_targets = np.concatenate([batch_targets, np.zeros(pad, np.int32)])
        cams, batch_logits, batch_used = _compute_batch(
            model, variables, batch, jnp.asarray(batch_targets), layers=layers, method=method, size=size
        )
        keep = len(batch) - pad
        maps.append(np.asarray(cams)[:keep])
        logits.append(np.asarray(batch_logits)[:keep])
        used.append(np.asarray(batch_used)[:keep])
        finite = np.isfinite(logits[-1]).all(axis=1)
        if not finite.all():  # the images are finite (checked above): most likely the variables are not
            raise ValueError(f"The model's logits for image {start + int(np.argmin(finite))} are NaN or infinite, "
                             f"so it cannot be explained (do the variables hold NaN or infinite values, from a "
                             f"training that diverged?).")
    return np.concatenate(maps).astype(np.float32), np.concatenate(logits), np.concatenate(used)


def compute(
    model: Any,
    variables: Any,
    images: Any,
    *,
    layer: str | Sequence[str] = "layer3",
    targets: Any = None,
    method: str = "gradcam",
    resize: bool = True,
) -> np.ndarray:
    """Class activation maps (N, H, W) float32 in [0, 1] for normalized float images (N, H, W, 3).

    `targets=None` explains the predicted class, else one class index per image. `layer`
    is a stage name (`layer1..layer4`) or a list of them (combined as the mean of the
    normalized per-layer maps, normalized again). `method` is one of METHODS. With
    `resize=False` the maps keep the layer's resolution (the finest chosen layer's).
    The maps are computed in float32, also for a model whose compute dtype is bfloat16.
    """
    return compute_with_outputs(model, variables, images, layer=layer, targets=targets, method=method, resize=resize)[0]

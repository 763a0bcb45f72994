"""Faithfulness of saliency maps: deletion / insertion AUC (Petsiuk et al. 2018, RISE) and
average drop / increase in confidence (Chattopadhyay et al. 2018).

All functions take a `predict` callable from normalized float images (B, H, W, 3) to logits
(B, K); probabilities are the softmax of the target class. Images are normalized, so the
deletion baseline 0 is the dataset mean colour.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxcam._checks import check_non_negative_integer, check_positive_integer, in_unit_range, is_integer, is_number
from jaxcam.cam import check_target_range
from jaxcam.models import check_image_batch

Predict = Callable[[np.ndarray], np.ndarray]


def _check_inputs(images: np.ndarray, saliency: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Images (N, H, W, 3) as float32, saliency (N, H, W) and integer targets (N,), or ValueError."""
    images = np.asarray(images)
    # uint8 pixels would be scored as they are, with black (not the mean) as the deletion baseline.
    check_image_batch(images.shape, images.dtype)
    images = images.astype(np.float32)
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("No images to score (the batch is empty).")
    if not np.isfinite(images).all():
        # They would reach predict and come back as NaN logits, blamed on the model.
        raise ValueError("The images contain NaN or infinite values.")
    saliency, targets = np.asarray(saliency), np.asarray(targets)
    if saliency.shape != (n, h, w):
        raise ValueError(f"Saliency maps must have shape {(n, h, w)}, got {saliency.shape}.")
    if not np.isfinite(saliency).all():
        raise ValueError("Saliency maps contain NaN or infinite values, so they rank no pixels.")
    if targets.shape != (n,) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"Give one integer target class per image: {n} images, targets {targets.dtype} {targets.shape}.")
    return images, saliency, targets


def _check_baseline(baseline: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The baseline broadcast to the images' shape (N, H, W, 3): one per image, one image, or one colour."""
    baseline = np.asarray(baseline, np.float32)
    try:
        baseline = np.broadcast_to(baseline, shape)
    except ValueError:
        raise ValueError(
            f"The baseline must have the images' shape {shape}, or one image's or one colour's, got {baseline.shape}."
        ) from None
    if not np.isfinite(baseline).all():
        raise ValueError("The baseline has NaN or infinite values.")
    return baseline


def _softmax_target(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    check_target_range(targets, logits.shape[-1])
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    return probs[np.arange(len(targets)), targets]


def _predict_in_chunks(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, K) of `predict` run on `batch_size` (checked by the caller) images at a time, or ValueError."""
    chunks = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        logits = np.asarray(predict(chunk))
        if logits.ndim != 2 or len(logits) != len(chunk):
            raise ValueError(f"predict must return logits (B, K) for a batch of B images; for {len(chunk)} images "
                             f"it returned shape {logits.shape}.")
        if not np.isfinite(logits).all():
            # Softmax of NaN logits would turn every score into NaN without a word.
            raise ValueError("predict returned NaN or infinite logits, so no probabilities can be scored.")
        chunks.append(logits)
    return np.concatenate(chunks)


def blur(images: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, C) images (edge-replicated): RISE's insertion canvas."""
    if np.ndim(images) != 4:
        raise ValueError(f"blur takes a batch of images (N, H, W, C), got shape {np.shape(images)}.")
    if not is_number(sigma) or sigma <= 0:
        # sigma 0 gave NaN images and a negative one blurred as its absolute value.
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma!r}.")
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(images, np.float64)
    for axis in (1, 2):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return out.astype(np.float32)


def deletion_insertion_curves(
    predict: Predict,
    images: np.ndarray,
    saliency: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = 32,
    mode: str = "deletion",
    baseline: np.ndarray | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Target probability (N, steps + 1) as pixels are deleted (or inserted) most-salient first.

    Step k has the top `round(k / steps * H * W)` pixels of the saliency (N, H, W) replaced by
    the baseline (deletion: 0 = mean colour; insertion starts from the baseline, by default a
    blurred copy, and puts the image's pixels back). A given baseline is normalized like the
    images: (N, H, W, 3), one image (H, W, 3) or one colour (3,).
    """
    images, saliency, targets = _check_inputs(images, saliency, targets)
    n, h, w, channels = images.shape
    check_positive_integer(steps, "steps")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"Unknown mode {mode!r}; choose 'deletion' or 'insertion'.")
    if baseline is not None:
        baseline = _check_baseline(baseline, images.shape)
    check_positive_integer(batch_size, "batch_size")
    order = np.argsort(-saliency.reshape(n, -1), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(int)
    # The sequences are built and scored a group of images at a time: all of them at once
    # would hold N * (steps + 1) images (400 MB for 1017 CIFAR images at 32 steps).
    group = max(1, batch_size // (steps + 1))
    probabilities = []
    for first in range(0, n, group):
        part = slice(first, first + group)
        if baseline is not None:
            base = baseline[part]
        else:
            base = np.zeros_like(images[part]) if mode == "deletion" else blur(images[part])
        start, end = (images[part], base) if mode == "deletion" else (base, images[part])
        changed = ranks[part, None, :] < counts[None, :, None]  # (G, steps + 1, H*W): pixels switched so far
        changed = changed.reshape(-1, steps + 1, h, w, 1)
        sequence = np.where(changed, end[:, None], start[:, None]).reshape(-1, h, w, channels)
        logits = _predict_in_chunks(predict, sequence, batch_size)
        probabilities.append(_softmax_target(logits, np.repeat(targets[part], steps + 1)))
    return np.concatenate(probabilities).reshape(n, steps + 1)


def auc(curves: np.ndarray) -> np.ndarray:
    """Area under each curve (N, steps + 1) over x in [0, 1] by the trapezoid rule: (N,)."""
    curves = np.asarray(curves, np.float64)
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"auc takes curves (N, steps + 1) of at least two points each, got shape {curves.shape}.")
    if not np.isfinite(curves).all():
        raise ValueError("The curves contain NaN or infinite values, so they have no area.")
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * (curves.shape[1] - 1))


def confidence_change(
    predict: Predict, images: np.ndarray, saliency: np.ndarray, targets: np.ndarray, batch_size: int = 512
) -> tuple[float, float]:
    """(average drop %, increase in confidence %) of the explanation map `image * saliency`,
    for saliency maps (N, H, W) in [0, 1].

    Average drop = mean over images of max(0, Y - O) / Y * 100; increase in confidence = the
    percentage of images with O > Y; Y and O are the target probabilities of the image and
    of the explanation map.
    """
    images, saliency, targets = _check_inputs(images, saliency, targets)
    # The maps multiply the images, so a map outside [0, 1] scores a scaled or negated image.
    if not in_unit_range(saliency):  # finite already (_check_inputs)
        raise ValueError(
            f"Saliency maps must lie in [0, 1] to multiply the images, got values from {saliency.min():.4g} to "
            f"{saliency.max():.4g}; normalize them first (jaxcam.cam.minmax, as cam.compute does)."
        )
    check_positive_integer(batch_size, "batch_size")
    full = _softmax_target(_predict_in_chunks(predict, images, batch_size), targets)
    masked = _softmax_target(_predict_in_chunks(predict, images * saliency[..., None], batch_size), targets)
    # A target probability that underflows to 0 cannot drop: its term is 0, not 0 / 0 = NaN.
    drop = np.divide(np.maximum(0.0, full - masked), full, out=np.zeros_like(full), where=full > 0)
    return float(100 * drop.mean()), float(100 * np.mean(masked > full))


def faithfulness(
    predict: Predict,
    images: np.ndarray,
    saliency: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = 32,
    batch_size: int = 512,
) -> dict[str, float]:
    """Deletion AUC (lower is better), insertion AUC (higher), average drop % (lower) and
    increase in confidence % (higher), averaged over the images."""
    deletion = auc(deletion_insertion_curves(predict, images, saliency, targets, steps=steps, mode="deletion",
                                             batch_size=batch_size))
    insertion = auc(deletion_insertion_curves(predict, images, saliency, targets, steps=steps, mode="insertion",
                                              batch_size=batch_size))
    drop, increase = confidence_change(predict, images, saliency, targets, batch_size)
    return {"deletion_auc": float(deletion.mean()), "insertion_auc": float(insertion.mean()),
            "average_drop": drop, "increase_in_confidence": increase}


def random_saliency(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """The random-map baseline: uniform noise maps (N, H, W)."""
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(is_integer(d, 0) for d in shape)):
        raise ValueError(f"shape must be (N, H, W), three sizes of at least 0, got {shape!r}.")
    check_non_negative_integer(seed, "seed")
    return np.random.default_rng(seed).random(shape, dtype=np.float32)

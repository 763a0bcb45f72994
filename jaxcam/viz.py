"""Figures for reports: CAM overlays, curves, galleries, confusion matrix, per-class bars.

Images are uint8 RGB (N, H, W, 3) as loaded (never BGR); CAMs are float maps in [0, 1]
drawn with a perceptual colormap ('inferno' by default).
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from jaxcam._checks import check_class_indices, in_unit_range, is_number

CMAP = "inferno"
PathLike = str | os.PathLike
# Title colours: a wrong prediction, and a right (or the most likely) one.
WRONG, RIGHT = "#b00020", "#006400"
# What the curves draw of each history.json record (its 'lr' they do not need).
CURVE_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


def check_uint8_rgb(images: np.ndarray, who: str, batch: bool = True) -> np.ndarray:
    """`images` as a uint8 RGB array (N, H, W, 3), or (H, W, 3) with batch=False; else ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 + batch or images.shape[-1] != 3:
        # Float or normalized images would be divided by 255 again, or clipped by imshow, and
        # drawn wrong without a word.
        expected = "uint8 RGB images (N, H, W, 3)" if batch else "a uint8 RGB image (H, W, 3)"
        advice = "; pass the images before normalization" if images.dtype != np.uint8 else ""
        raise ValueError(f"{who} takes {expected}, got {images.dtype} with shape {images.shape}{advice}.")
    return images


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = CMAP) -> np.ndarray:
    """Blend a colormapped CAM (H, W) in [0, 1] over a uint8 RGB image (H, W, 3): float RGB in [0, 1]."""
    image, cam = check_uint8_rgb(image, "overlay", batch=False), np.asarray(cam)
    if image.shape[:2] != cam.shape:
        raise ValueError(f"The CAM {cam.shape} and the image {image.shape[:2]} must have the same size "
                         "(cam.compute resizes its maps to the image unless resize=False).")
    if not (is_number(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"overlay's alpha is the CAM's share of the blend, in [0, 1], got {alpha!r}.")
    # A raw map (before min-max) would be clipped to a flat saturated colour, NaN drawn as black;
    # the small tolerance keeps a map resized after normalization, which can overshoot by rounding.
    if not in_unit_range(cam, tolerance=1e-5):
        raise ValueError("overlay takes a CAM of finite values normalized to [0, 1]; normalize it first "
                         "(jaxcam.cam.minmax, as cam.compute does).")
    try:
        colormap = cmap if isinstance(cmap, matplotlib.colors.Colormap) else matplotlib.colormaps[cmap]
    except KeyError:  # matplotlib's own words name its registry ("'nope' is not a known colormap name")
        raise ValueError(f"Unknown colour map {cmap!r}; give a matplotlib colormap name such as {CMAP!r} "
                         "or 'jet'.") from None
    heat = colormap(np.clip(cam, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image.astype(np.float32) / 255 + alpha * heat, 0, 1)


def subplots(*args, figsize: tuple[float, float], dpi: float, layout: str | None = None, **kwargs):
    """`pyplot.subplots` without pyplot: (figure, axes) of a figure that belongs to no backend.

    Pyplot would need a backend, and choosing one here (matplotlib.use("Agg")) would switch that
    of the caller: a notebook that imported jaxcam lost its inline plots. A bare Figure saves
    PNGs by itself and is freed with its last reference, so nothing is left open either.
    """
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight", facecolor="white")


def _show(ax, picture, title: str | None = None, color: str = "black", fontsize: int = 8) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize, color=color)


def plot_curves(history: Sequence[dict], path: PathLike) -> None:
    """Train and test loss and accuracy per epoch; `history` is a list of per-epoch records (dicts)
    with numbers for CURVE_KEYS, as in a run's history.json."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = subplots(1, 2, figsize=(10, 3.8), dpi=110, layout="constrained")
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train", color="#1f77b4")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test", color="#d62728")
    ax_loss.set_title("Loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train", color="#1f77b4")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], "s-", label="test", color="#d62728")
    ax_acc.set_title("Accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        if not history:  # empty axes would show made-up ticks around 0 as if they were data
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no per-epoch history recorded", ha="center", va="center", transform=ax.transAxes,
                    color="#555555")
            continue
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray,
                       class_names: Sequence[str], path: PathLike, title: str = "Misclassified test images") -> None:
    """A gallery of images titled 'true → predicted (confidence)', five per row, mistakes in red
    (and any correct ones in green).

    images: uint8 RGB (N, H, W, 3); labels, predictions: (N,) class indices; confidences: (N,)
    probabilities of the predicted classes.
    """
    images = check_uint8_rgb(images, "plot_misclassified")
    n = len(images)
    labels, predictions = check_class_indices(labels, predictions, len(class_names))
    confidences = np.asarray(confidences)
    cols = min(5, n)
    rows = int(np.ceil(n / cols))
    fig, axes = subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), dpi=110, layout="constrained", squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.ravel(), images, labels, predictions, confidences):
        _show(ax, image, f"true: {class_names[t]}\npred: {class_names[p]} ({100 * c:.0f}%)",
              color=WRONG if t != p else RIGHT)
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def _plot_panel_rows(rows, path, title: str, panel_width: float = 2.2) -> None:
    """A table of pictures: `rows` is a list of rows, each a list of (picture, title, title colour)."""
    n, cols = len(rows), max(len(row) for row in rows)
    # Fixed margins in inches rather than a layout engine: constrained layout grows
    # super-linearly with the panel count (a 200-row gallery took 63 s to lay out, 400 rows
    # more than 5 min); this takes 6 s for 200 rows and looks the same.
    height = 2.2 * n + 0.45
    fig, axes = subplots(n, cols, figsize=(panel_width * cols, height), dpi=110, squeeze=False,
                         gridspec_kw=dict(left=0.02, right=0.98, top=1 - 0.45 / height, bottom=0.05 / height,
                                          hspace=0.22, wspace=0.08))
    for ax_row, row in zip(axes, rows):
        for ax in ax_row[len(row) :]:
            ax.axis("off")
        for ax, (picture, panel_title, color) in zip(ax_row, row):
            _show(ax, picture, panel_title, color=color)
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height)
    _save(fig, path)


def plot_cam_grid(images: np.ndarray, cams_predicted: np.ndarray, cams_true: np.ndarray, labels: np.ndarray,
                  predictions: np.ndarray, class_names: Sequence[str], path: PathLike, title: str,
                  alpha: float = 0.5) -> None:
    """Rows of image | CAM for the predicted class | CAM for the true class.

    images: uint8 RGB (N, H, W, 3); cams_predicted, cams_true: (N, H, W) in [0, 1]; labels,
    predictions: (N,) class indices (a wrong prediction's title is red).
    """
    labels, predictions = check_class_indices(labels, predictions, len(class_names))
    rows = [
        [(image, f"true: {class_names[t]}", "black"),
         (overlay(image, cp, alpha), f"CAM for pred: {class_names[p]}", WRONG if p != t else "black"),
         (overlay(image, ct, alpha), f"CAM for true: {class_names[t]}", "black")]
        for image, cp, ct, t, p in zip(images, cams_predicted, cams_true, labels, predictions)
    ]
    _plot_panel_rows(rows, path, title)


def plot_top_classes(images: np.ndarray, cams: np.ndarray, classes: np.ndarray, probabilities: np.ndarray,
                     row_titles: Sequence[str], class_names: Sequence[str], path: PathLike, title: str,
                     alpha: float = 0.5) -> None:
    """Images without labels (a user's own files) explained for their top classes.

    images: uint8 RGB (N, H, W, 3); cams: (N, k, H, W) in [0, 1] for the ranked classes (N, k);
    probabilities: (N, K) over all classes. Each row: the image titled `row_titles[i]`, then one
    overlay per class.
    """
    probabilities = np.asarray(probabilities)
    rows = [
        [(image, row_title, "black")]
        + [(overlay(image, cam, alpha), f"#{rank + 1}: {class_names[c]} ({100 * image_probs[c]:.1f}%)", "black")
           for rank, (cam, c) in enumerate(zip(image_cams, image_classes))]
        for image, image_cams, image_classes, image_probs, row_title in zip(images, cams, classes, probabilities,
                                                                            row_titles)
    ]
    _plot_panel_rows(rows, path, title)


def plot_all_targets(image: np.ndarray, cams: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                     path: PathLike, title: str, alpha: float = 0.5) -> None:
    """One image explained for every class: the image, then one overlay per class with its probability.

    image: uint8 RGB (H, W, 3); cams: (K, H, W) in [0, 1], one per class; probabilities: (K,).
    The most likely class's title is green.
    """
    probabilities = np.asarray(probabilities)
    k = len(cams)
    cols = 6 if k > 5 else k + 1
    rows = int(np.ceil((k + 1) / cols))
    fig, axes = subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows), dpi=110, layout="constrained", squeeze=False)
    for ax in axes.ravel()[k + 1 :]:
        ax.axis("off")
    best = int(np.argmax(probabilities))
    _show(axes.ravel()[0], image, "input")
    for ax, (index, cam_map) in zip(axes.ravel()[1:], enumerate(cams)):
        _show(ax, overlay(image, cam_map, alpha), f"{class_names[index]} ({100 * probabilities[index]:.1f}%)",
              color=RIGHT if index == best else "black")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows are true classes, columns predicted classes; labels, predictions: (N,)."""
    labels, predictions = check_class_indices(labels, predictions, num_classes)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: PathLike) -> None:
    """The counts (K, K) of `confusion_matrix` as a Blues heat map, true rows against predicted columns."""
    k = len(class_names)
    matrix = np.asarray(matrix)
    fig, ax = subplots(figsize=(7.2, 6.2), dpi=110, layout="constrained")
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_title("Confusion matrix (test)")
    _save(fig, path)


def plot_per_class_accuracy(accuracies: np.ndarray, class_names: Sequence[str], path: PathLike) -> None:
    """Bars of the per-class accuracies (K,) in [0, 1]; NaN (a class without test images) gets no
    bar and the label "no images"."""
    accuracies = np.asarray(accuracies)
    fig, ax = subplots(figsize=(7.5, 3.6), dpi=110, layout="constrained")
    bars = ax.bar(range(len(class_names)), 100 * np.nan_to_num(accuracies), color="#4c72b0")
    # Labelled "0.0" as before, a class without test images read as one the model always got wrong.
    ax.bar_label(bars, [f"{100 * a:.1f}" if np.isfinite(a) else "no images" for a in accuracies], fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Per-class test accuracy")
    _save(fig, path)


def plot_samples_per_class(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: PathLike,
                           per_class: int = 8) -> None:
    """A grid with one row per class and its first `per_class` images (uint8 RGB (N, H, W, 3), labels (N,))."""
    images = check_uint8_rgb(images, "plot_samples_per_class")
    k = len(class_names)
    fig, axes = subplots(k, per_class, figsize=(1.1 * per_class + 1.2, 1.15 * k), dpi=110, layout="constrained", squeeze=False)
    for row, name in enumerate(class_names):
        picks = np.flatnonzero(labels == row)[:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            if col < len(picks):
                _show(ax, images[picks[col]])
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Training samples per class", fontsize=11)
    _save(fig, path)


AVERAGE_ROWS = ("macro avg", "weighted avg")  # the report's rows after the classes


def classification_report(labels: np.ndarray, predictions: np.ndarray,
                          class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class, plus macro and weighted averages (as
    scikit-learn's `classification_report(..., zero_division=0)`); labels, predictions: (N,)."""
    k = len(class_names)
    matrix = confusion_matrix(labels, predictions, k).astype(np.float64)
    tp = np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / matrix.sum(0))
        recall = np.nan_to_num(tp / matrix.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    support = matrix.sum(1)
    report = {name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
              for i, name in enumerate(class_names)}
    report[AVERAGE_ROWS[0]] = {"precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean(),
                               "support": int(support.sum())}
    weights = support / max(support.sum(), 1)
    report[AVERAGE_ROWS[1]] = {"precision": (precision * weights).sum(), "recall": (recall * weights).sum(),
                               "f1": (f1 * weights).sum(), "support": int(support.sum())}
    return report

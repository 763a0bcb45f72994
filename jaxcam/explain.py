"""Reports for a trained run: curves, galleries, Grad-CAM overlays, confusion matrix,
per-class accuracy, precision/recall/F1, faithfulness, and `report.md` / `report.html`."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import html
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import jax
import numpy as np

from jaxcam import cam as cam_lib
from jaxcam import data as data_lib
from jaxcam import metrics as metrics_lib
from jaxcam import models
from jaxcam import rundir
from jaxcam import train as train_lib
from jaxcam import viz
from jaxcam._checks import is_integer, is_path
from jaxcam.checkpoint import CheckpointError, load_variables, make_writable_folder, missing_folders, remove_if_empty
from jaxcam.configuration import config_from_json
from jaxcam.errors import JaxcamError, WriteError
from jaxcam.models import STAGES

if TYPE_CHECKING:  # for annotations only; Pillow itself is imported where image files are read
    import PIL.Image

REQUIRED_FILES = ("curves.png", "misclassified.png", "gradcam_layer3.png", "gradcam_layer2.png",
                  "gradcam_targets.png", "confusion_matrix.png", "report.md")


# A CAM gallery row is 242 px tall: 100 rows make a 24,000 px image, about the most a viewer
# can scroll through (and matplotlib refuses images over 65,536 px).
MAX_GALLERY_ROWS = 100


@dataclasses.dataclass
class LoadedRun:
    """A run's config, history, model and best variables, its classes and the training split's
    normalization; `dataset` is None when loaded without the data (`load_run(with_data=False)`)."""

    run_dir: Path
    config: object
    history: list[dict]
    model: object
    variables: dict
    meta: dict
    dataset: data_lib.Cifar10 | None
    class_names: tuple[str, ...]
    mean: np.ndarray  # float32 (3,), in [0, 1]
    std: np.ndarray  # float32 (3,)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the run trained on (32x32 for CIFAR-10 and runs that predate the record)."""
        return tuple(self.meta.get("image_size", (32, 32)))

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) -> float32 (N, H, W, 3) with the training split's mean and std."""
        return np.asarray(data_lib.normalize(data_lib.check_images(images), self.mean, self.std))

    @functools.cached_property
    def _forward(self):
        # Jitted even for a few images: one compilation is quicker than eager op-by-op dispatch.
        return jax.jit(lambda variables, x: self.model.apply(variables, x, train=False))

    def logits(self, normalized: np.ndarray) -> np.ndarray:
        """Logits (N, K) of normalized float images (N, H, W, 3), in eval mode."""
        return np.asarray(self._forward(self.variables, normalized))


def load_run(run_dir: str | os.PathLike, which: str = "best", data_dir: str | None = None,
             dataset: data_lib.Cifar10 | None = None, *, with_data: bool = True) -> LoadedRun:
    """A run's config, history and `which` checkpoint, and its dataset: `dataset` (as passed to
    `train_and_evaluate(dataset=...)`), else read from `data_dir`, else from the run's config.

    The classes and the normalization are those training recorded in the checkpoint (the data's
    own for a checkpoint written before they were recorded). `with_data=False`, enough to classify
    new images, then reads no data and leaves `dataset` None.
    """
    if dataset is not None and data_dir is not None:
        raise ValueError("Give the data either as a dataset or as data_dir, not both.")
    run_dir = rundir.check_run_dir(run_dir)
    config = config_from_json(run_dir / "config.json")
    history = rundir.read_history(run_dir)
    variables, meta = load_variables(run_dir, which)
    # Explanations run in float32 whatever the training compute dtype was.
    config.dtype = "float32"
    recorded = rundir.recorded_normalization(run_dir, which, meta)
    if with_data or dataset is not None or data_dir is not None or recorded is None:
        dataset = _load_trained_data(run_dir, config, meta, data_dir, dataset)
    # The model takes its inputs as training normalized them, whatever split or copy the data now is.
    class_names, mean, std = recorded or (dataset.class_names, dataset.mean, dataset.std)
    model = train_lib.build(config, len(class_names))
    try:
        models.check_variables(model, variables, what=f"The weights of the {which} checkpoint in {str(run_dir)!r}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return LoadedRun(run_dir, config, history, model, variables, meta, dataset, class_names,
                     np.asarray(mean, np.float32), np.asarray(std, np.float32))


def _load_trained_data(run_dir: Path, config, meta: dict, data_dir: str | None,
                       dataset: data_lib.Cifar10 | None) -> data_lib.Cifar10:
    """`dataset`, else the data at `data_dir`, else at the run's config; checked against the
    classes the run was trained on."""
    if data_dir is not None:
        # explain.py has one --data-dir for both kinds of copy: a tensorflow-datasets folder is read
        # as tfds_data_dir, so a run trained through tfds elsewhere finds its data here.
        tfds_root = data_lib.tfds_data_dir_of(data_dir)
        config.data_dir, config.tfds_data_dir = (None, str(tfds_root)) if tfds_root else (data_dir, None)
    given_dataset = dataset is not None
    try:
        dataset = dataset if given_dataset else train_lib.load_dataset(config)
    except data_lib.DataError as e:
        if data_dir is not None:
            raise
        # A run copied from another machine names a path of that machine.
        raise data_lib.DataError(f"{str(e).rstrip('.')} (the data named in the run's config.json; give "
                                 "a copy on this machine with explain.py --data-dir).") from None
    # A run trained on a dataset passed in code keeps its config's data_dir (None: tfds' CIFAR-10),
    # which may hold other classes; with as many of them the explanations would be silently wrong.
    source = ("the dataset given" if given_dataset else repr(config.data_dir) if config.data_dir is not None
              else "tensorflow-datasets' cifar10")
    rundir.check_trained_classes(run_dir, meta, dataset, f"its data ({source})",
                                    "give the data it was trained on (explain.py --data-dir, or dataset= in code)")
    return dataset


def _training_precision_note(meta: dict) -> str:
    """Why the report's float32 accuracy can differ from the one training printed for the same
    checkpoint: training evaluated in its compute dtype (bfloat16 by default on GPUs and TPUs)."""
    trained_in = meta.get("compute_dtype", "float32")
    if trained_in == "float32" or "test_acc" not in meta:
        return ""
    return (f", computed in float32 as the explanations are; training measured {100 * meta['test_acc']:.2f}% "
            f"for this checkpoint in {trained_in}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def _to_rgb8(img: "PIL.Image.Image", path: str | os.PathLike) -> "PIL.Image.Image":
    """The image upright and as 8-bit RGB, as the model saw its training images."""
    from PIL import Image, ImageOps

    # Phone cameras store the sensor's pixels and the way to turn them upright in EXIF.
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        # PIL's own conversion clips 16-bit values at 255, which turns the image white.
        return Image.fromarray(np.round(np.asarray(img, np.float64) / 257).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        raise data_lib.DataError(
            f"{str(path)!r} has 32-bit {'float' if img.mode == 'F' else 'integer'} pixels of no fixed range; "
            "save it as an 8-bit or 16-bit PNG or a JPEG.")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent pixels keep whatever colour is stored under them (often black), which the
        # user never sees: viewers show them on white, so the model is shown them on white too.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike],
                     size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Read PNG/JPEG files (or one file) as uint8 RGB (N, H, W, 3), resized with antialiasing to
    `size` (H, W), the size the model trained on.

    Photos are turned upright by their EXIF orientation; 16-bit PNGs are scaled to 8 bits;
    transparent pixels are shown on white.
    """
    from PIL import Image, UnidentifiedImageError

    paths = _path_list(paths)
    if not paths:
        raise data_lib.DataError("Give at least one image file to explain.")
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(np.asarray(_to_rgb8(img, path).resize(size[::-1], Image.Resampling.LANCZOS), np.uint8))
        except FileNotFoundError:
            raise data_lib.DataError(f"Image file {str(path)!r} does not exist.") from None
        except IsADirectoryError:
            raise data_lib.DataError(f"{str(path)!r} is a folder, not an image file; name the PNG or JPEG files "
                                     "in it.") from None
        except Image.DecompressionBombError:  # PIL's guard against images made to exhaust memory
            raise data_lib.DataError(
                f"{str(path)!r} has more pixels than PIL opens safely ({2 * Image.MAX_IMAGE_PIXELS:,}); scale it "
                f"down first, as it is resized to {size[1]}x{size[0]} anyway.") from None
        except (UnidentifiedImageError, OSError) as e:
            raise data_lib.DataError(f"{str(path)!r} is not a readable PNG or JPEG image ({type(e).__name__}).") from None
    return np.stack(images)


def explain_images(
    run: LoadedRun, images: np.ndarray, *, layer: str = "layer3", method: str = "gradcam", top: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify unlabelled uint8 RGB images (N, H, W, 3) and explain their `top` most likely classes.

    Returns the probabilities (N, K), the top classes ranked (N, top) and their CAMs (N, top, H, W).
    """
    if not is_integer(top, 1) or top > run.num_classes:
        raise ValueError(f"top must be between 1 and {run.num_classes}, got {top}.")
    x = run.normalize(images)
    probabilities = _softmax(run.logits(x))  # the classes must be known before their CAMs
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    # Every (image, class) pair in one batch: one forward and VJP, not `top`.
    cams = cam_lib.compute(run.model, run.variables, np.repeat(x, top, 0), layer=layer, targets=classes.ravel(),
                           method=method)
    return probabilities, classes, cams.reshape(len(images), top, *cams.shape[1:])


def explain_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    layers: Sequence[str] = ("layer3", "layer2"),
    method: str = "gradcam",
    num: int = 10,
    image_files: str | os.PathLike | Sequence[str | os.PathLike] = (),
    faithfulness_images: int = 64,
    data_dir: str | None = None,
    dataset: data_lib.Cifar10 | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write every report file for `run_dir` into `out_dir` (default `<run_dir>/report`), with
    `method`'s CAMs at `layers` (the first is the main one) for the `num` most confident
    mistakes; the data as `load_run` takes it (`dataset`, `data_dir` or the run's config)."""
    layers = list(layers) if not isinstance(layers, str) else [layers]
    image_files = _path_list(image_files)
    run = _load_run_for_report(run_dir, data_dir, dataset, image_files)
    custom = load_image_files(image_files, run.image_size) if image_files else None  # read before writing anything
    if method == "scorecam" and jax.default_backend() == "cpu":
        # Its passes run inside one jitted program, so no progress bar can show them: say why it waits.
        skip = " (--faithfulness 0 skips its largest part)" if faithfulness_images else ""
        log(f"Score-CAM runs a forward pass for each of the {models.stage_features(run.config.width, layers[0])} "
            f"channels of {layers[0]} for every map, so on a CPU this report can take minutes{skip}.")
    final = Path(out_dir if out_dir is not None else run.run_dir / "report")
    # Galleries of an earlier report that this one does not draw go, so the folder matches report.md.
    with _staged(final, replaces=(*(f"gradcam_{stage}.png" for stage in STAGES), "custom_images.png")) as out:
        test = _TestPredictions.of(run)
        report = _Report(f"jaxcam report: {run.run_dir.name}", _summary_lines(run, test, method, layers))
        report.figures.append(("curves.png", "Loss and accuracy per epoch"
                               + ("" if run.history else " (the run has no history.json)")))
        plot_misclassified_cams(run, test, layers, method, num, out, report)
        plot_every_class_cam(run, test, layers[0], method, out, report)
        plot_test_figures(run, test, out, report)
        if faithfulness_images > 0:
            report.tables.append(faithfulness_table(run, test, layers[0], method, faithfulness_images))
        if custom is not None:
            report.own_images = _plot_own_images(run, custom, image_files, layers[0], method, out, log)
            report.figures.append(("custom_images.png", "Your images with the CAMs of their two most likely classes"))
        (out / "report.md").write_text(report.markdown())
        (out / "report.html").write_text(report.html(out))
    log(f"Wrote the report to {final / 'report.md'} and {final / 'report.html'}")
    return final


def _load_run_for_report(run_dir, data_dir, dataset, image_files) -> LoadedRun:
    try:
        return load_run(run_dir, data_dir=data_dir, dataset=dataset)
    except data_lib.DataError as e:
        if not image_files or data_dir is not None or dataset is not None:
            raise
        # Someone with a run copied from Colab and a photo to classify need not fetch CIFAR-10.
        raise data_lib.DataError(f"{str(e).rstrip('.')}; to classify and explain only your images, which needs no "
                                 "data, add --images-only.") from None


@dataclasses.dataclass
class _TestPredictions:
    """The best checkpoint's outputs on the test split: probabilities (N, K), predictions (N,),
    and the summary of `train.evaluate`."""

    images: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray
    summary: dict

    @classmethod
    def of(cls, run: LoadedRun) -> "_TestPredictions":
        mesh = train_lib.make_mesh()
        predict_fn = train_lib.make_predict_fn(run.model, mesh, run.mean, run.std)
        images, labels = run.dataset.test_images, run.dataset.test_labels
        logits = train_lib.predict(predict_fn, run.variables, images, 500, mesh)
        return cls(images, labels, _softmax(logits), logits.argmax(-1), train_lib.evaluate(logits, labels))


@dataclasses.dataclass
class _Report:
    """What report.md and report.html show: a summary list, figures (file, caption), tables
    (heading, header, rows) and the user's own images (file, top-3 text)."""

    title: str
    summary: list[str]
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = dataclasses.field(default_factory=list)
    own_images: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", *(f"- {item}" for item in self.summary), ""]
        for name, caption in self.figures:
            lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
        for heading, header, rows in self.tables:
            lines += [f"## {heading}", "", "| " + " | ".join(header) + " |",
                      "|---|" + "---:|" * (len(header) - 1), *("| " + " | ".join(row) + " |" for row in rows), ""]
        if self.own_images:
            lines += ["## Your images (top-3 classes)", "", *(f"- `{p}`: {t}" for p, t in self.own_images), ""]
        return "\n".join(lines)

    def html(self, folder: Path) -> str:
        """The same page as one self-contained HTML file, the figures embedded as base64."""
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>", _html_list(self.summary)]
        for name, caption in self.figures:
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(f'<h2>{e(caption)}</h2><img alt="{e(caption)}" src="data:image/png;base64,{data}">')
        for heading, header, rows in self.tables:
            head = "".join(f"<th>{e(c)}</th>" for c in header)
            cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<h2>{e(heading)}</h2><table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        if self.own_images:
            body.append("<h2>Your images (top-3 classes)</h2>" + _html_list(f"{p}: {t}" for p, t in self.own_images))
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
                f"<style>{_REPORT_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


_REPORT_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
                 "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
                 "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}")


def _html_list(items) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(item.replace('**', ''))}</li>" for item in items) + "</ul>"


def _summary_lines(run: LoadedRun, test: _TestPredictions, method: str, layers: Sequence[str]) -> list[str]:
    summary = test.summary
    lines = [f"Model: {run.config.model} (width {run.config.width}), best checkpoint of epoch {run.meta.get('epoch')}",
             f"Test accuracy: **{100 * summary['accuracy']:.2f}%** ({summary['correct']}/{summary['total']}), "
             f"test loss {summary['loss']:.4f}{_training_precision_note(run.meta)}"]
    if run.history:
        best = max(run.history, key=lambda r: r["test_acc"])
        lines.append(f"Epochs trained: {len(run.history)}; best epoch {best['epoch']} ({100 * best['test_acc']:.2f}%); "
                     f"final train accuracy {100 * run.history[-1]['train_acc']:.2f}%")
    return lines + [f"Explanations: {method} at {', '.join(layers)}"]


def plot_misclassified_cams(run: LoadedRun, test: _TestPredictions, layers: Sequence[str], method: str, num: int,
                            out: Path, report: _Report) -> None:
    """misclassified.png (the `num` most confident mistakes) and gradcam_<layer>.png (their CAMs
    for the predicted and the true class) for each of `layers`."""
    names, predictions, labels = run.class_names, test.predictions, test.labels
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-test.probabilities[wrong, predictions[wrong]], kind="stable")][:num]
    if len(wrong):
        caption = f"The {len(wrong)} most confident misclassifications (true → predicted)"
        title = "Misclassified test images"
    else:  # a perfect model: show, and say, correct ones instead
        wrong = np.arange(min(num, len(labels)))
        caption = title = f"No test image is misclassified; the first {len(wrong)} instead"
    picked = test.images[wrong]
    viz.plot_misclassified(picked, labels[wrong], predictions[wrong], test.probabilities[wrong, predictions[wrong]],
                           names, out / "misclassified.png", title=title)
    report.figures.append(("misclassified.png", caption))
    normalized = run.normalize(picked)
    for layer in layers:
        # The predicted and the true class in one batch: one forward and VJP per layer, not two.
        cams = cam_lib.compute(run.model, run.variables, np.concatenate([normalized, normalized]), layer=layer,
                               targets=np.concatenate([predictions[wrong], labels[wrong]]), method=method)
        height, width = (side >> STAGES.index(layer) for side in run.image_size)  # stages halve the resolution
        size = f"{width}x{height}"
        viz.plot_cam_grid(picked, *np.split(cams, 2), labels[wrong], predictions[wrong], names,
                          out / f"gradcam_{layer}.png", title=f"{method} at {layer} ({size}): predicted vs true class")
        report.figures.append((f"gradcam_{layer}.png", f"{method} at {layer} ({size}) for the predicted and the "
                               "true class"))


def plot_every_class_cam(run: LoadedRun, test: _TestPredictions, layer: str, method: str, out: Path,
                         report: _Report) -> None:
    """gradcam_targets.png: the most confidently right test image explained for every class."""
    right = np.flatnonzero(test.predictions == test.labels)
    index = int(right[np.argmax(test.probabilities[right, test.predictions[right]])]) if len(right) else 0
    every = np.arange(run.num_classes)
    cams = cam_lib.compute(run.model, run.variables, np.repeat(run.normalize(test.images[index:index + 1]),
                                                               len(every), 0), layer=layer, targets=every, method=method)
    viz.plot_all_targets(test.images[index], cams, test.probabilities[index], run.class_names,
                         out / "gradcam_targets.png",
                         title=f"{method} at {layer} for every class (true: {run.class_names[test.labels[index]]})")
    report.figures.append(("gradcam_targets.png", "One test image explained for each of the classes"))


def plot_test_figures(run: LoadedRun, test: _TestPredictions, out: Path, report: _Report) -> None:
    """curves.png, confusion_matrix.png, per_class_accuracy.png, samples.png, and the
    precision/recall/F1 table."""
    names, k = run.class_names, run.num_classes
    viz.plot_curves(run.history, out / "curves.png")
    viz.plot_confusion_matrix(viz.confusion_matrix(test.labels, test.predictions, k), names,
                              out / "confusion_matrix.png")
    viz.plot_per_class_accuracy(train_lib.per_class_accuracy(test.predictions, test.labels, k), names,
                                out / "per_class_accuracy.png")
    viz.plot_samples_per_class(run.dataset.train_images, run.dataset.train_labels, names, out / "samples.png")
    report.figures += [("confusion_matrix.png", "Confusion matrix on the test split"),
                       ("per_class_accuracy.png", "Accuracy per class"), ("samples.png", "Training samples per class")]
    rows = viz.classification_report(test.labels, test.predictions, names)
    report.tables.append(("Precision, recall and F1 (test)", ["class", "precision", "recall", "F1", "support"],
                          [[name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"])]
                           for name, r in rows.items()]))


def faithfulness_table(run: LoadedRun, test: _TestPredictions, layer: str, method: str,
                       count: int) -> tuple[str, list[str], list[list[str]]]:
    """Deletion/insertion AUC, average drop and increase in confidence of the CAMs of the first
    `count` test images (all of them, if fewer), against a random baseline, as a report table."""
    count = min(count, len(test.images))
    x = run.normalize(test.images[:count])
    maps = cam_lib.compute(run.model, run.variables, x, layer=layer, method=method)
    rows = []
    for label, saliency in ((f"{method} ({layer})", maps), ("random baseline", metrics_lib.random_saliency(maps.shape))):
        m = metrics_lib.faithfulness(run.logits, x, saliency, test.predictions[:count], steps=16)
        rows.append([label, f"{m['deletion_auc']:.3f}", f"{m['insertion_auc']:.3f}", f"{m['average_drop']:.1f}",
                     f"{m['increase_in_confidence']:.1f}"])
    return (f"Faithfulness (the first {count} test images, predicted class)",
            ["map", "deletion AUC ↓", "insertion AUC ↑", "average drop % ↓", "increase in confidence % ↑"], rows)


def explain_image_files(
    run_dir: str | os.PathLike,
    image_files: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    layer: str | Sequence[str] = "layer3",
    method: str = "gradcam",
    data_dir: str | None = None,
    dataset: data_lib.Cifar10 | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Classify and explain only `image_files` (explain.py --images-only): log each file's top 3
    classes and write `custom_images.png` into `out_dir` (default `<run_dir>/images`, apart from
    the report, whose own copy it would leave out of step), with CAMs at `layer` (of a list, the
    first). Needs no dataset: the checkpoint holds the classes and the normalization (for a run
    trained before they were recorded, the data is read as `load_run` reads it)."""
    layer = layer if isinstance(layer, str) else layer[0]
    image_files = _path_list(image_files)
    run = load_run(run_dir, data_dir=data_dir, dataset=dataset, with_data=False)
    custom = load_image_files(image_files, run.image_size)
    final = Path(out_dir if out_dir is not None else run.run_dir / "images")
    with _staged(final) as out:
        _plot_own_images(run, custom, image_files, layer, method, out, log)
    log(f"Wrote {final / 'custom_images.png'}")
    return final


def _path_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list:
    """The paths as a list, one path given alone as a list of one: iterated, a string would have
    been read character by character."""
    return [paths] if is_path(paths) else list(paths)


def _plot_own_images(run: LoadedRun, images: np.ndarray, image_files: Sequence, layer: str, method: str, out: Path,
                     log: Callable[[str], None]) -> list[tuple[str, str]]:
    """Log the top 3 classes of each of the user's images and draw `custom_images.png` with the
    CAMs of their two most likely classes; returns (file, top-3 text) rows for the report."""
    names = run.class_names
    probs, top_classes, cams_top = explain_images(run, images, layer=layer, method=method)
    rows = []
    for path, image_probs in zip(image_files, probs):
        top = np.argsort(-image_probs, kind="stable")[:3]
        text = ", ".join(f"{names[i]} {100 * image_probs[i]:.1f}%" for i in top)
        log(f"{path}: {text}")
        rows.append((str(path), text))
    viz.plot_top_classes(images, cams_top, top_classes, probs, [Path(f).name for f in image_files], names,
                         out / "custom_images.png",
                         title=f"Your images: {method} at {layer} for their top {top_classes.shape[1]} classes")
    return rows


@contextlib.contextmanager
def _staged(folder: Path, replaces: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh hidden folder inside the output folder `folder`, which is made (with its parents)
    if missing; on success its files replace those in `folder`, and the files named in `replaces`
    that it did not write are removed. On an error or a stop it is removed and `folder` keeps what
    it had: the folders made for it go again, being empty (a stopped first report had left an
    empty `report/`); after a success they hold the report."""
    made = missing_folders(folder)
    staging = None
    try:
        make_writable_folder(folder, "the output folder")
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=folder))
        try:
            yield staging
            written = {path.name for path in staging.iterdir()}
            for name in sorted(written):
                os.replace(staging / name, folder / name)
            for name in set(replaces) - written:
                if (folder / name).is_file():
                    (folder / name).unlink()
        except OSError as e:
            if isinstance(e, JaxcamError):
                raise
            raise WriteError(f"Could not write the report in {str(folder)!r} ({e.strerror or e}).") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty(made)

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from jaxcam import viz

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def predictions_with_gaps(seed=0):
    """Labels and predictions over 5 classes where class 3 is never predicted and class 4 never occurs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 300)
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, 300))
    predictions[predictions == 3] = 0
    return labels, predictions


def test_confusion_matrix_equals_sklearn():
    labels, predictions = predictions_with_gaps()
    np.testing.assert_array_equal(viz.confusion_matrix(labels, predictions, 5),
                                  sklearn_metrics.confusion_matrix(labels, predictions, labels=range(5)))


def test_classification_report_equals_sklearn():
    labels, predictions = predictions_with_gaps(1)
    names = ["a", "b", "c", "d", "e"]
    ours = viz.classification_report(labels, predictions, names)
    theirs = sklearn_metrics.classification_report(labels, predictions, labels=range(5), target_names=names,
                                                   output_dict=True, zero_division=0)
    for row in names + ["macro avg", "weighted avg"]:
        for column in ("precision", "recall", "f1-score", "support"):
            assert ours[row]["f1" if column == "f1-score" else column] == pytest.approx(theirs[row][column]), (row, column)


@pytest.mark.parametrize("labels, predictions, message", [
    ([1, 0], [12, 10], "Class prediction 12 is out of range for 10 classes."),
    ([0, -1], [0, 1], "Class label -1 is out of range for 10 classes."),
    ([0, 1, 2], [0, 1], r"Give one label and one prediction per example, as arrays \(N,\); got shapes \(3,\) and \(2,\)"),
    ([0.0, 1.0], [0, 1], "Class labels must be integers, got float64."),
])
@pytest.mark.parametrize("count", ["confusion_matrix", "classification_report", "per_class_accuracy"])
def test_class_counts_refuse_indices_out_of_range(count, labels, predictions, message):
    # bincount over label * K + prediction filed prediction 12 of label 1 under (2, 2) without a word.
    from jaxcam import train

    labels, predictions = np.array(labels), np.array(predictions)
    with pytest.raises(ValueError, match=message):
        if count == "confusion_matrix":
            viz.confusion_matrix(labels, predictions, 10)
        elif count == "classification_report":
            viz.classification_report(labels, predictions, [str(k) for k in range(10)])
        else:
            train.per_class_accuracy(predictions, labels, 10)


def test_class_counts_need_a_class_count():
    # A string had reached numpy's comparison: "ufunc 'greater_equal' did not contain a loop".
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got '10'."):
        viz.confusion_matrix(np.array([0, 1]), np.array([1, 1]), "10")


@pytest.mark.parametrize("names, message", [
    (["cat", "dog", "cat"], "classification_report's class names are not usable: each must be distinct, but 'cat' is "
                            "given more than once."),
    (["cat", "weighted avg", "dog"], "A class may not be named 'weighted avg' in classification_report: the report "
                                     "keeps that row for an average."),
    ("abc", "classification_report's class names are not usable: give one name per class"),
])
def test_classification_report_refuses_names_that_would_merge_rows(names, message):
    # The report is keyed by name: a second 'cat' had overwritten the first's row, and a class
    # named 'weighted avg' had been overwritten by the average, each without a word.
    labels = np.array([0, 1, 2, 2])
    with pytest.raises(ValueError) as raised:
        viz.classification_report(labels, labels, names)
    assert str(raised.value).startswith(message)


def test_overlay_blends_rgb_with_the_colormap():
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0] = 255  # pure red: the overlay must keep RGB order, not turn it blue
    cam = np.linspace(0, 1, 24).reshape(4, 6)
    np.testing.assert_allclose(viz.overlay(image, cam, alpha=0.0), image / 255.0)
    np.testing.assert_allclose(viz.overlay(image, cam, alpha=1.0), plt.get_cmap("inferno")(cam)[..., :3], rtol=1e-6)
    half = viz.overlay(image, cam, alpha=0.5)
    np.testing.assert_allclose(half, (viz.overlay(image, cam, alpha=0.0) + viz.overlay(image, cam, alpha=1.0)) / 2,
                               rtol=1e-6)


def test_overlay_rejects_what_it_cannot_draw():
    cam = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match=r"^overlay takes a uint8 RGB image \(H, W, 3\), got float32 with shape "
                                         r"\(32, 32, 3\); pass the images before normalization\.$"):
        viz.overlay(np.zeros((32, 32, 3), np.float32), cam)  # would come out black
    # The advice fits the fault: a uint8 image is not helped by "before normalization".
    with pytest.raises(ValueError, match=r"got uint8 with shape \(3, 32, 32\) \(PyTorch's CHW order\? transpose with "
                                         r"image.transpose\(1, 2, 0\)\)\.$"):
        viz.overlay(np.zeros((3, 32, 32), np.uint8), cam)
    with pytest.raises(ValueError, match=r"got uint8 with shape \(1, 32, 32, 3\); pass one image of the batch, such as "
                                         r"images\[0\]\.$"):
        viz.overlay(np.zeros((1, 32, 32, 3), np.uint8), cam)
    with pytest.raises(ValueError, match="same size"):
        viz.overlay(np.zeros((16, 16, 3), np.uint8), cam)
    with pytest.raises(ValueError, match=r"alpha is the CAM's share of the blend, in \[0, 1\], got 1.5"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, alpha=1.5)  # would invert the image's share
    for alpha in ("0.5", True):  # a string had failed in a comparison, and True blended as 1
        with pytest.raises(ValueError, match=rf"alpha is the CAM's share of the blend, in \[0, 1\], got {alpha!r}"):
            viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, alpha=alpha)
    # A raw map had been clipped to [0, 1] without a word: mostly one saturated colour.
    with pytest.raises(ValueError, match=r"overlay takes a CAM normalized to \[0, 1\], got values from -2 to 37; "
                                         r"normalize it first \(jaxcam.cam.minmax"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), np.linspace(-2, 37, 1024).reshape(32, 32))
    with pytest.raises(ValueError, match=r"got values from 0 to 0 and NaN"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), np.where(np.eye(32) > 0, np.nan, 0.0))
    # An all-NaN map had read "got values from nan to nan and NaN", with a RuntimeWarning.
    with pytest.raises(ValueError, match=r"overlay takes a CAM normalized to \[0, 1\], got only NaN; normalize"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), np.full((32, 32), np.nan))
    # matplotlib's own error had said "'nope' is not a valid value for name".
    with pytest.raises(ValueError, match=r"^Unknown colour map 'nope'; give a matplotlib colormap name such as "
                                         r"'inferno' or 'jet'\.$"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, cmap="nope")


@pytest.mark.parametrize("plot", ["plot_misclassified", "plot_samples_per_class"])
def test_galleries_refuse_normalized_images(plot, tmp_path):
    # Normalized images had been drawn clipped to [0, 1] by imshow, with only a log warning.
    normalized = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    labels, names = np.array([0, 1]), ["cat", "dog"]
    arguments = {"plot_misclassified": (normalized, labels, labels[::-1], np.array([0.9, 0.8]), names, tmp_path / "a.png"),
                 "plot_samples_per_class": (normalized, labels, names, tmp_path / "a.png")}[plot]
    with pytest.raises(ValueError, match=rf"{plot} takes uint8 RGB images \(N, H, W, 3\), got float32 with shape "
                                         r"\(2, 32, 32, 3\); pass the images before normalization."):
        getattr(viz, plot)(*arguments)
    with pytest.raises(ValueError, match=r"got uint8 with shape \(32, 32, 3\) \(one image\? add the batch axis with "
                                         r"image\[None\]\)\.$"):
        getattr(viz, plot)(np.zeros((32, 32, 3), np.uint8), *arguments[1:])
    assert not (tmp_path / "a.png").exists()


def test_per_class_accuracy_plot_is_written(tmp_path):
    # A class without test images has accuracy NaN; it is drawn as an empty bar, not an error.
    viz.plot_per_class_accuracy(np.array([0.5, np.nan, 1.0]), ["a", "b", "c"], tmp_path / "bars.png")
    with Image.open(tmp_path / "bars.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10
    # ...and not as an accuracy of 0: its bar had been labelled "0.0", the same picture pixel for pixel.
    viz.plot_per_class_accuracy(np.array([0.5, 0.0, 1.0]), ["a", "b", "c"], tmp_path / "zero.png")
    with Image.open(tmp_path / "bars.png") as nan, Image.open(tmp_path / "zero.png") as zero:
        assert (np.asarray(nan) != np.asarray(zero)).any()


_NAMES = [f"c{k}" for k in range(4)]
_IMAGES = np.zeros((3, 8, 8, 3), np.uint8)
_MAPS = np.zeros((3, 8, 8), np.float32)
_LABELS, _PREDICTIONS = np.array([0, 1, 2]), np.array([1, 1, 3])


@pytest.mark.parametrize("plot, arguments, message", [
    ("plot_misclassified", (_IMAGES, _LABELS[:2], _PREDICTIONS[:2], np.ones(2), _NAMES),
     "plot_misclassified needs labels for each of the 3 images, got 2."),
    ("plot_misclassified", (_IMAGES, np.array([0, 1, -1]), _PREDICTIONS, np.ones(3), _NAMES),
     "Class label -1 is out of range for 4 classes."),
    ("plot_cam_grid", (_IMAGES, _MAPS[:1], _MAPS, _LABELS, _PREDICTIONS, _NAMES),
     "plot_cam_grid needs cams_predicted for each of the 3 images, got 1."),
    ("plot_cam_grid", (_IMAGES, _MAPS, _MAPS, _LABELS, np.array([0, 1, 4]), _NAMES),
     "Class prediction 4 is out of range for 4 classes."),
    ("plot_top_classes", (_IMAGES, _MAPS[:, None], np.zeros((3, 1), int), np.ones((3, 4)) / 4, ["a", "b"], _NAMES),
     "plot_top_classes needs row_titles for each of the 3 images, got 2."),
    ("plot_top_classes", (_IMAGES, _MAPS[:, None], np.full((3, 1), 7), np.ones((3, 4)) / 4, ["a", "b", "c"], _NAMES),
     "Class label 7 is out of range for 4 classes."),
    ("plot_all_targets", (_IMAGES[0], _MAPS, np.ones(3) / 3, _NAMES),
     "plot_all_targets needs cams for each of the 4 classes, got 3."),
    ("plot_samples_per_class", (_IMAGES, np.array([0, 5, 1]), _NAMES),
     "Class label 5 is out of range for 4 classes."),
    ("plot_per_class_accuracy", (np.ones(3), _NAMES),
     "plot_per_class_accuracy needs accuracies for each of the 4 classes, got 3."),
    ("plot_confusion_matrix", (np.eye(3, dtype=int), _NAMES),
     r"plot_confusion_matrix takes counts \(4, 4\) for 4 class names, got shape \(3, 3\)."),
])
def test_figures_refuse_arrays_that_do_not_match(plot, arguments, message, tmp_path):
    # Zipped, the shortest array had cut a gallery short; a negative class index had titled an
    # image with the last class's name; too few class names had labelled a matrix's rows wrongly.
    # All without a word.
    titled = ("plot_cam_grid", "plot_top_classes", "plot_all_targets")
    with pytest.raises(ValueError, match=message):
        getattr(viz, plot)(*arguments, tmp_path / "figure.png", *(["title"] if plot in titled else []))
    assert not (tmp_path / "figure.png").exists()


_RECORD = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "test_loss": 2.1, "test_acc": 0.15}


@pytest.mark.parametrize("plot, arguments, keywords, message", [
    # An empty gallery had failed in a ZeroDivisionError or in max() of an empty sequence.
    ("plot_misclassified", (_IMAGES[:0], _LABELS[:0], _PREDICTIONS[:0], np.ones(0), _NAMES), {},
     "^plot_misclassified has no images to draw.$"),
    ("plot_cam_grid", (_IMAGES[:0], _MAPS[:0], _MAPS[:0], _LABELS[:0], _PREDICTIONS[:0], _NAMES), {},
     "^plot_cam_grid has no images to draw.$"),
    ("plot_top_classes", (_IMAGES[:0], _MAPS[:0, None], np.zeros((0, 1), int), np.ones((0, 4)) / 4, [], _NAMES), {},
     "^plot_top_classes has no images to draw.$"),
    # Percentages had been drawn as fractions: 55 read "5500%", an accuracy bar ran off the chart.
    ("plot_misclassified", (_IMAGES, _LABELS, _PREDICTIONS, np.array([55.0, 80.0, 90.0]), _NAMES), {},
     r"^plot_misclassified takes confidences as fractions in \[0, 1\] \(0.55 for 55%\), got values from 55 to 90.$"),
    ("plot_per_class_accuracy", (np.array([55.0, np.nan, 60.0, 70.0]), _NAMES), {},
     r"^plot_per_class_accuracy takes accuracies as fractions in \[0, 1\] \(0.55 for 55%\), got values from 55 to 70"
     r" and NaN.$"),
    ("plot_top_classes", (_IMAGES, _MAPS[:, None], np.zeros((3, 1), int), np.full((3, 4), 25.0), ["a", "b", "c"],
                          _NAMES), {},
     r"^plot_top_classes takes probabilities as fractions in \[0, 1\] \(0.55 for 55%\), got values from 25 to 25.$"),
    ("plot_all_targets", (_IMAGES[0], np.zeros((4, 8, 8), np.float32), np.array([10.0, 20.0, 30.0, 40.0]), _NAMES),
     {}, r"^plot_all_targets takes probabilities as fractions in \[0, 1\] \(0.55 for 55%\), got values from 10 to 40.$"),
    ("plot_misclassified", (_IMAGES, _LABELS, _PREDICTIONS, np.array(["high", "low", "low"]), _NAMES), {},
     r"^plot_misclassified takes confidences as fractions in \[0, 1\] \(0.55 for 55%\), got <U4 values.$"),
    # Negative or fractional counts had been drawn and printed as if they were counts.
    ("plot_confusion_matrix", (-np.eye(4, dtype=int), _NAMES), {},
     r"^plot_confusion_matrix takes counts \(whole numbers of at least 0\), got values from -1 to 0.$"),
    ("plot_confusion_matrix", (np.full((4, 4), 0.25), _NAMES), {},
     r"^plot_confusion_matrix takes counts \(whole numbers of at least 0\), got values from 0.25 to 0.25.$"),
    # matplotlib's own words: "Number of columns must be a positive integer, not 0".
    ("plot_samples_per_class", (_IMAGES, _LABELS, _NAMES), {"per_class": 0},
     r"^plot_samples_per_class's per_class must be a positive integer, got 0.$"),
    ("plot_samples_per_class", (_IMAGES, _LABELS, _NAMES), {"per_class": 2.5},
     r"^plot_samples_per_class's per_class must be a positive integer, got 2.5.$"),
    # A history without the losses had failed in KeyError: 'train_loss'.
    ("plot_curves", ([{"epoch": 1}],), {},
     r"^plot_curves takes per-epoch records as in history.json: record 0 has no number for 'train_loss', 'train_acc', "
     r"'test_loss', 'test_acc'.$"),
    ("plot_curves", ({"epoch": [1]},), {},
     r"^plot_curves takes per-epoch records as in history.json: it must be a list of them, got a dict.$"),
    ("plot_curves", ([_RECORD, {**_RECORD, "test_acc": "0.2"}],), {},
     r"^plot_curves takes per-epoch records as in history.json: record 1 has no number for 'test_acc'.$"),
])
def test_figures_refuse_what_they_would_draw_wrong(plot, arguments, keywords, message, tmp_path):
    titled = ("plot_cam_grid", "plot_top_classes", "plot_all_targets")
    with pytest.raises(ValueError, match=message):
        getattr(viz, plot)(*arguments, tmp_path / "figure.png", *(["title"] if plot in titled else []), **keywords)
    assert not (tmp_path / "figure.png").exists()


def test_curves_accept_a_history_without_the_learning_rate(tmp_path):
    # The curves need no 'lr'; a history written by other code can leave it out.
    viz.plot_curves([_RECORD, {**_RECORD, "epoch": 2, "test_acc": 0.3}], tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10

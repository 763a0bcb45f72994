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
    # A uint8 image is not helped by "before normalization".
    with pytest.raises(ValueError, match=r"got uint8 with shape \(3, 32, 32\)\.$"):
        viz.overlay(np.zeros((3, 32, 32), np.uint8), cam)
    with pytest.raises(ValueError, match="same size"):
        viz.overlay(np.zeros((16, 16, 3), np.uint8), cam)
    with pytest.raises(ValueError, match=r"alpha is the CAM's share of the blend, in \[0, 1\], got 1.5"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, alpha=1.5)  # would invert the image's share
    for alpha in ("0.5", True):
        with pytest.raises(ValueError, match=rf"alpha is the CAM's share of the blend, in \[0, 1\], got {alpha!r}"):
            viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, alpha=alpha)
    message = r"overlay takes a CAM of finite values normalized to \[0, 1\]; normalize it first \(jaxcam.cam.minmax"
    for raw in (np.linspace(-2, 37, 1024).reshape(32, 32), np.where(np.eye(32) > 0, np.nan, 0.0),
                np.full((32, 32), np.nan)):
        with pytest.raises(ValueError, match=message):
            viz.overlay(np.zeros((32, 32, 3), np.uint8), raw)
    # matplotlib's own error had said "'nope' is not a valid value for name".
    with pytest.raises(ValueError, match=r"^Unknown colour map 'nope'; give a matplotlib colormap name such as "
                                         r"'inferno' or 'jet'\.$"):
        viz.overlay(np.zeros((32, 32, 3), np.uint8), cam, cmap="nope")


@pytest.mark.parametrize("plot", ["plot_misclassified", "plot_samples_per_class"])
def test_galleries_refuse_normalized_images(plot, tmp_path):
    normalized = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    labels, names = np.array([0, 1]), ["cat", "dog"]
    arguments = {"plot_misclassified": (normalized, labels, labels[::-1], np.array([0.9, 0.8]), names, tmp_path / "a.png"),
                 "plot_samples_per_class": (normalized, labels, names, tmp_path / "a.png")}[plot]
    with pytest.raises(ValueError, match=rf"{plot} takes uint8 RGB images \(N, H, W, 3\), got float32 with shape "
                                         r"\(2, 32, 32, 3\); pass the images before normalization."):
        getattr(viz, plot)(*arguments)
    with pytest.raises(ValueError, match=r"got uint8 with shape \(32, 32, 3\)\.$"):
        getattr(viz, plot)(np.zeros((32, 32, 3), np.uint8), *arguments[1:])
    assert not (tmp_path / "a.png").exists()


def test_per_class_accuracy_plot_is_written(tmp_path):
    # A class without test images has accuracy NaN; it is drawn as an empty bar, not an error.
    viz.plot_per_class_accuracy(np.array([0.5, np.nan, 1.0]), ["a", "b", "c"], tmp_path / "bars.png")
    with Image.open(tmp_path / "bars.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10
    viz.plot_per_class_accuracy(np.array([0.5, 0.0, 1.0]), ["a", "b", "c"], tmp_path / "zero.png")
    with Image.open(tmp_path / "bars.png") as nan, Image.open(tmp_path / "zero.png") as zero:
        assert (np.asarray(nan) != np.asarray(zero)).any()




_RECORD = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "test_loss": 2.1, "test_acc": 0.15}


def test_curves_accept_a_history_without_the_learning_rate(tmp_path):
    # The curves need no 'lr'; a history written by other code can leave it out.
    viz.plot_curves([_RECORD, {**_RECORD, "epoch": 2, "test_acc": 0.3}], tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10

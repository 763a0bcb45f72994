"""Faithfulness metrics on a constructed model whose target probability is known in closed form."""

import tracemalloc

import numpy as np
import pytest

from jaxcam import metrics

H = W = 8
REGION = (slice(0, 4), slice(0, 4))  # the "object": 16 of 64 pixels


def predict(images):
    """Class 0 probability p = mean of channel 0 over REGION (images in [0, 1]); logits = log(p, 1-p)."""
    p = np.clip(np.asarray(images, np.float64)[:, REGION[0], REGION[1], 0].mean(axis=(1, 2)), 1e-12, 1 - 1e-12)
    return np.log(np.stack([p, 1 - p], -1))


def object_saliency(n):
    s = np.zeros((n, H, W), np.float32)
    s[:, REGION[0], REGION[1]] = 1.0
    s += np.linspace(0, 0.5, H * W).reshape(H, W)[None] * (s == 0)  # a strict order outside the object
    return s


def test_deletion_auc_known_answer():
    images = np.ones((2, H, W, 3), np.float32)
    # Deleting the 16 object pixels first: p falls linearly to 0 over the first 16/64 of the x-axis,
    # then stays 0. With 16 steps (4 pixels each) the trapezoid is exact: AUC = (16/64) / 2.
    curves = metrics.deletion_insertion_curves(predict, images, object_saliency(2), np.zeros(2, int), steps=16)
    np.testing.assert_allclose(curves[0, :5], [1, 0.75, 0.5, 0.25, 0], atol=1e-9)
    np.testing.assert_allclose(metrics.auc(curves), 0.125, atol=1e-9)
    # Least relevant first: the object goes last, AUC = 1 - 0.125.
    reverse = metrics.auc(metrics.deletion_insertion_curves(predict, images, -object_saliency(2), np.zeros(2, int), steps=16))
    np.testing.assert_allclose(reverse, 0.875, atol=1e-9)


def test_insertion_auc_known_answer():
    images = np.ones((1, H, W, 3), np.float32)
    baseline = np.zeros_like(images)
    curves = metrics.deletion_insertion_curves(predict, images, object_saliency(1), np.zeros(1, int), steps=16,
                                               mode="insertion", baseline=baseline)
    # p rises linearly to 1 over the first quarter, then stays: AUC = 1 - 0.125.
    np.testing.assert_allclose(metrics.auc(curves), 0.875, atol=1e-9)


def test_average_drop_and_increase_known_answer():
    images = np.ones((2, H, W, 3), np.float32)
    # A map that keeps the object fully: no drop, no increase.
    drop, increase = metrics.confidence_change(predict, images, object_saliency(2), np.zeros(2, int))
    assert drop == pytest.approx(0.0, abs=1e-9) and increase == 0.0
    # A flat 0.5 map halves p: average drop 50%.
    drop, increase = metrics.confidence_change(predict, images, np.full((2, H, W), 0.5, np.float32), np.zeros(2, int))
    assert drop == pytest.approx(50.0, abs=1e-6) and increase == 0.0
    # A map of ones keeps every image as it is: no drop.
    half = images.copy()
    half[1] *= 0.5
    drop, increase = metrics.confidence_change(predict, half, np.full((2, H, W), 1.0, np.float32), np.zeros(2, int))
    assert drop == pytest.approx(0.0, abs=1e-9)


def test_object_map_beats_random_baseline():
    images = np.ones((8, H, W, 3), np.float32)
    targets = np.zeros(8, int)
    good = metrics.faithfulness(predict, images, object_saliency(8), targets, steps=16)
    rand = metrics.faithfulness(predict, images, metrics.random_saliency((8, H, W)), targets, steps=16)
    assert good["deletion_auc"] < rand["deletion_auc"]
    assert good["average_drop"] < rand["average_drop"]


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curves_are_scored_a_group_of_images_at_a_time(mode):
    n, steps = 64, 32
    rng = np.random.default_rng(0)
    images = rng.random((n, H, W, 3), np.float32)
    saliency, targets = rng.random((n, H, W)), np.zeros(n, int)
    tracemalloc.start()
    try:
        grouped = metrics.deletion_insertion_curves(predict, images, saliency, targets, steps=steps, mode=mode,
                                                    batch_size=steps + 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sequence_bytes = n * (steps + 1) * images[0].nbytes
    assert peak < sequence_bytes / 4, (peak, sequence_bytes)
    # The grouping changes no score (insertion's default blurred baseline included).
    at_once = metrics.deletion_insertion_curves(predict, images, saliency, targets, steps=steps, mode=mode,
                                                batch_size=n * (steps + 1))
    np.testing.assert_allclose(grouped, at_once, rtol=1e-12)
    assert grouped.shape == (n, steps + 1)


def test_blur_preserves_constant_images():
    x = np.full((1, 8, 8, 3), 0.3, np.float32)
    np.testing.assert_allclose(metrics.blur(x), x, atol=1e-6)


@pytest.mark.parametrize(
    "saliency, targets, message",
    [
        (np.ones((2, 4, 4)), np.zeros(2, int), "Saliency maps must have shape"),
        (np.full((2, H, W), np.nan), np.zeros(2, int), "Saliency maps contain NaN or infinite values"),
        (np.ones((2, H, W)), np.zeros(3, int), "Give one integer target class per image: 2 images"),
        (np.ones((2, H, W)), np.array([0.0, 1.0]), "Give one integer target class per image"),
        (np.ones((2, H, W)), np.array([0, -1]), "Target class -1 is out of range for a model with 2 classes."),
        (np.ones((2, H, W)), np.array([0, 2]), "Target class 2 is out of range for a model with 2 classes."),
    ],
)
@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_bad_inputs_are_checked(metric, saliency, targets, message):
    # confidence_change had no checks: a wrong map shape broadcast silently, and a target of -1
    # (here and in the curves) read the last class's probability.
    with pytest.raises(ValueError, match=message):
        getattr(metrics, metric)(predict, np.ones((2, H, W, 3)), saliency, targets)


@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_images_must_be_normalized_float_nhwc(metric):
    with pytest.raises(ValueError, match="Images must be normalized float arrays .*, got dtype uint8"):
        getattr(metrics, metric)(predict, np.ones((2, H, W, 3), np.uint8), np.ones((2, H, W)), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"Images must have shape \(N, H, W, 3\) NHWC, got \(2, 3, 8, 8\)\."):
        getattr(metrics, metric)(predict, np.ones((2, 3, 8, 8)), np.ones((2, 8, 8)), np.zeros(2, int))


@pytest.mark.parametrize("low, high", [(-0.5, 1.0), (0.0, 5.0)])
def test_confidence_change_needs_maps_in_unit_range(low, high):
    saliency = np.linspace(low, high, 2 * H * W).reshape(2, H, W)
    with pytest.raises(ValueError, match=rf"must lie in \[0, 1\] .* from {low:g} to {high:g}; normalize them first"):
        metrics.confidence_change(predict, np.ones((2, H, W, 3)), saliency, np.zeros(2, int))
    # Deletion and insertion rank the pixels, so there any real-valued map is fine.
    metrics.deletion_insertion_curves(predict, np.ones((2, H, W, 3)), saliency, np.zeros(2, int), steps=4)


def test_baseline_broadcasts_from_one_colour():
    images = np.ones((2, H, W, 3), np.float32)
    per_image = metrics.deletion_insertion_curves(
        predict, images, object_saliency(2), np.zeros(2, int), steps=4, baseline=np.full_like(images, 0.25))
    one_colour = metrics.deletion_insertion_curves(
        predict, images, object_saliency(2), np.zeros(2, int), steps=4, baseline=np.full(3, 0.25))
    np.testing.assert_array_equal(per_image, one_colour)
    # Step 1 of 4 deletes the 16 object pixels of the 64: p falls from 1 to the baseline's 0.25.
    np.testing.assert_allclose(per_image[:, :2], [[1, 0.25], [1, 0.25]], atol=1e-9)


@pytest.mark.parametrize("baseline, message", [
    (np.zeros((H, W)), r"The baseline must have the images' shape \(2, 8, 8, 3\), or one image's or one colour's, "
                       r"got \(8, 8\)"),
    (np.full(3, np.nan), "The baseline has NaN or infinite values."),
])
def test_bad_baseline(baseline, message):
    with pytest.raises(ValueError, match=message):
        metrics.deletion_insertion_curves(predict, np.ones((2, H, W, 3)), np.ones((2, H, W)), np.zeros(2, int),
                                          baseline=baseline)


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        metrics.deletion_insertion_curves(predict, np.ones((2, H, W, 3)), np.ones((2, H, W)), np.zeros(2, int), steps=0)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_batch_size_must_be_positive(metric, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size}"):
        getattr(metrics, metric)(predict, np.ones((2, H, W, 3)), np.ones((2, H, W)), np.zeros(2, int),
                                 batch_size=batch_size)


@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_an_empty_batch_is_named(metric):
    with pytest.raises(ValueError, match=r"No images to score \(the batch is empty\)"):
        getattr(metrics, metric)(predict, np.ones((0, H, W, 3)), np.ones((0, H, W)), np.zeros(0, int))


@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_predict_must_return_finite_logits_per_image(metric):
    def nan_logits(images):
        return np.full((len(images), 2), np.nan)

    with pytest.raises(ValueError, match="predict returned NaN or infinite logits"):
        getattr(metrics, metric)(nan_logits, np.ones((2, H, W, 3)), np.ones((2, H, W)), np.zeros(2, int))

    def one_row(images):
        return predict(images)[:1]

    with pytest.raises(ValueError, match=r"predict must return logits \(B, K\) for a batch of B images; for 2 images "
                                         r"it returned shape \(1, 2\)"):
        getattr(metrics, metric)(one_row, np.ones((2, H, W, 3)), np.ones((2, H, W)), np.zeros(2, int), batch_size=2)


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan")])
def test_blur_needs_a_positive_sigma(sigma):
    # sigma 0 gave NaN images, and -1 blurred as if it were 1.
    with pytest.raises(ValueError, match=f"sigma must be a positive number of pixels, got {sigma}"):
        metrics.blur(np.ones((1, H, W, 3)), sigma=sigma)


def test_blur_needs_a_batch():
    with pytest.raises(ValueError, match=r"blur takes a batch of images \(N, H, W, C\), got shape \(8, 8, 3\)"):
        metrics.blur(np.ones((H, W, 3)))


@pytest.mark.parametrize("shape", [(2, 1), (5,)])
def test_auc_needs_curves_of_two_points(shape):
    # One point divided by zero (inf with a RuntimeWarning); a 1-d curve failed in indexing.
    with pytest.raises(ValueError, match=rf"auc takes curves \(N, steps \+ 1\) of at least two points each, "
                                         rf"got shape \({shape[0]},"):
        metrics.auc(np.ones(shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("metric", ["deletion_insertion_curves", "confidence_change"])
def test_images_must_be_finite(metric, bad):
    images = np.ones((2, H, W, 3))
    images[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match="The images contain NaN or infinite values."):
        getattr(metrics, metric)(predict, images, np.ones((2, H, W)), np.zeros(2, int))


@pytest.mark.filterwarnings("error")
def test_average_drop_of_a_probability_that_underflows_is_zero():
    # Image 0's target probability underflows to 0 (a logit 1000 below the other): it cannot drop,
    # and had made the average drop NaN (0 / 0, with a RuntimeWarning).
    def confident(images):
        logits = predict(images)
        logits[0] = [-1000.0, 0.0]
        return logits

    images = np.ones((2, H, W, 3), np.float32)
    drop, increase = metrics.confidence_change(confident, images, np.full((2, H, W), 0.5, np.float32),
                                               np.zeros(2, int))
    # Image 1 halves from p = 1 to 0.5 (a 50% drop); image 0 adds 0: the mean is 25%.
    assert drop == pytest.approx(25.0, abs=1e-6) and increase == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_auc_needs_finite_curves(bad):
    with pytest.raises(ValueError, match="The curves contain NaN or infinite values, so they have no area."):
        metrics.auc(np.array([[1.0, 0.5], [bad, 0.0]]))


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 8, 1), (2, -1, 8), (2, 8.0, 8), 5])
def test_random_saliency_needs_a_shape_of_maps(shape):
    # (2, 8) had given maps of one row each, and (2, 8, 8, 1) 4-d maps.
    with pytest.raises(ValueError, match=r"shape must be \(N, H, W\), three sizes of at least 0, got "):
        metrics.random_saliency(shape)


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_random_saliency_needs_a_non_negative_integer_seed(seed):
    # -1 had given numpy's "expected non-negative integer".
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got "):
        metrics.random_saliency((1, H, W), seed=seed)

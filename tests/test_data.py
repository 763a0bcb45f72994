import pickle
import re
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from conftest import (synthetic_arrays, tfrecord_copy_error, write_official_batches,
                      write_tfrecord_cifar10_metadata)
from jaxcam import data as data_lib
from jaxcam.data import DataError


# ----------------------------------------------------------------------------- local loader


def _check_matches_generated(d):
    train_x, train_y, test_x, test_y = synthetic_arrays(100, 30)
    np.testing.assert_array_equal(d.train_images, train_x)
    np.testing.assert_array_equal(d.train_labels, train_y)
    np.testing.assert_array_equal(d.test_images, test_x)
    np.testing.assert_array_equal(d.test_labels, test_y)
    assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == np.int32
    assert d.class_names == data_lib.CIFAR10_CLASSES


def test_local_folder(official_folder):
    _check_matches_generated(data_lib.load_cifar10(official_folder))


def test_local_parent_folder(official_folder):
    _check_matches_generated(data_lib.load_cifar10(official_folder.parent))


def test_local_archive_and_folder_holding_it(official_archive):
    _check_matches_generated(data_lib.load_cifar10(official_archive))
    _check_matches_generated(data_lib.load_cifar10(official_archive.parent))


def test_real_subset(real_subset):
    d = real_subset
    assert d.train_images.shape == (5085, 32, 32, 3) and d.test_images.shape == (1017, 32, 32, 3)
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    np.testing.assert_allclose(d.mean, [0.4936, 0.4846, 0.4483], atol=1e-4)
    np.testing.assert_allclose(d.std, [0.2481, 0.2446, 0.2621], atol=1e-4)
    # The official first training image is a frog (label 6) with a dark top-left corner.
    assert d.train_labels[0] == 6
    assert set(np.bincount(d.test_labels, minlength=10)) and np.bincount(d.train_labels).min() > 400


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data_lib.load_cifar10(tmp_path / "nope")


def test_a_path_that_is_not_a_path():
    # Path(3) raised Python's "expected str, bytes or os.PathLike object, not int".
    with pytest.raises(DataError, match="data_dir must be a path .* or None, got 3."):
        data_lib.load_cifar10(3)
    with pytest.raises(DataError, match=r"tfds_data_dir must be a path .* or None, got \['a'\]."):
        data_lib.load_cifar10(tfds_data_dir=["a"])


def test_an_empty_path_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^data_dir is an empty string; give a path, or None for tensorflow-datasets.$"):
        data_lib.load_cifar10("")
    with pytest.raises(DataError, match="^tfds_data_dir is an empty string; give a path, or None for "
                                        "tensorflow-datasets' default folder.$"):
        data_lib.load_cifar10(tfds_data_dir="")
    assert list(tmp_path.iterdir()) == []


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is neither an official CIFAR-10 copy .* nor an image-folder dataset"):
        data_lib.load_cifar10(tmp_path)


def test_other_downloads_are_refused_as_not_cifar10(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"\x00" * 64)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    with pytest.raises(DataError, match=r"is neither an official CIFAR-10 copy \(cifar-10-python.tar.gz, "):
        data_lib.load_cifar10(folder)
    with pytest.raises(DataError, match=r"has no member 'data_batch_1'\.$"):
        data_lib.load_cifar10(archive)


def test_missing_batch_file(official_folder, tmp_path):
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", *synthetic_arrays(100, 30))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing the file 'data_batch_3'"):
        data_lib.load_cifar10(folder)


def test_truncated_batch_file(tmp_path):
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", *synthetic_arrays(100, 30))
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2 .* is truncated or not a CIFAR-10 batch file"):
        data_lib.load_cifar10(folder)


def test_malformed_batch_contents(tmp_path):
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", *synthetic_arrays(100, 30))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, f)
    with pytest.raises(DataError, match="uint8 rows of 3072 values"):
        data_lib.load_cifar10(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 12]}, f)
    with pytest.raises(DataError, match="labels outside 0..9"):
        data_lib.load_cifar10(folder)
    for contents, message in [
        ([np.zeros((5, 3072), np.uint8)], r"test_batch in .* is not a CIFAR-10 batch file \(no dictionary inside\)."),
        ({b"data": np.zeros((5, 3072), np.uint8)}, "test_batch in .* lacks the 'data' or 'labels' entry of a CIFAR-10 "
                                                   "batch."),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2]}, "test_batch in .* has 5 images but 3 labels."),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": list("01234")},
         "test_batch in .* has labels of dtype <U1; CIFAR-10 labels are integers 0..9."),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1.5, 2, 3, 4]},
         "test_batch in .* has labels of dtype float64; CIFAR-10 labels are integers 0..9."),
    ]:
        with open(folder / "test_batch", "wb") as f:
            pickle.dump(contents, f)
        with pytest.raises(DataError, match=message):
            data_lib.load_cifar10(folder)


def test_class_names_come_from_batches_meta_unless_it_is_damaged(tmp_path):
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", *synthetic_arrays(100, 30))
    names = [name.encode() for name in data_lib.CIFAR10_CLASSES]
    names[0] = b"plane"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    assert data_lib.load_cifar10(folder).class_names == ("plane", *data_lib.CIFAR10_CLASSES[1:])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": tuple(names)}, f)  # a tuple, as a hand-written meta may hold them
    assert data_lib.load_cifar10(folder).class_names == ("plane", *data_lib.CIFAR10_CLASSES[1:])
    # A repeated or empty name would merge two classes' rows in the report: the published names serve.
    for damaged in (b"automobile", b""):
        names[0] = damaged
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": names}, f)
        assert data_lib.load_cifar10(folder).class_names == data_lib.CIFAR10_CLASSES


def test_corrupt_archive(tmp_path, official_archive):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08 definitely not a tarball")
    with pytest.raises(DataError, match="not a readable tar.gz file") as garbage:
        data_lib.load_cifar10(archive)
    # An interrupted download: a real archive cut short.
    archive.write_bytes(official_archive.read_bytes()[:5000])
    with pytest.raises(DataError, match="not a readable tar.gz file") as truncated:
        data_lib.load_cifar10(archive)
    for raised in (garbage, truncated):  # one sentence, not tarfile's list of tried compressions
        assert "\n" not in str(raised.value) and str(raised.value).endswith(").")


def test_a_batch_file_or_a_zip_is_refused_in_one_sentence(tmp_path, official_folder):
    with pytest.raises(DataError, match="is not a readable tar.gz file"):
        data_lib.load_cifar10(official_folder / "data_batch_1")
    with zipfile.ZipFile(tmp_path / "cifar-10-python.zip", "w") as archive:
        for batch in official_folder.iterdir():
            archive.write(batch, f"cifar-10-batches-py/{batch.name}")
    # A zip is read as an image-folder dataset, which this is not either.
    with pytest.raises(DataError, match="is neither an official CIFAR-10 copy .* nor an image-folder dataset"):
        data_lib.load_cifar10(tmp_path / "cifar-10-python.zip")


def test_tfds_path_under_mock_data(capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        d = data_lib.load_cifar10(None)
    # The mock's folder holds no prepared data, so the user is told why a first run waits.
    err = capsys.readouterr().err
    assert "CIFAR-10 is not prepared in " in err and "offline, pass a local copy with --config.data_dir." in err
    with tfds.testing.mock_data(num_examples=24):
        info_names = tfds.builder("cifar10").info.features["label"].names
    assert d.train_images.shape == (24, 32, 32, 3) and d.train_images.dtype == np.uint8
    assert d.test_images.shape == (24, 32, 32, 3)
    assert d.train_labels.dtype == np.int32 and d.train_labels.max() < 10
    assert d.class_names == tuple(info_names) and len(d.class_names) == 10
    assert d.mean.shape == (3,) and np.all(d.std > 0)


@pytest.mark.parametrize("spelled", ["as it is", "from the home folder", "as its cifar10 folder",
                                     "as its version folder"])
def test_a_copy_prepared_as_tfrecord_is_named_as_such(tmp_path, monkeypatch, spelled):
    pytest.importorskip("tensorflow_datasets")
    version_dir = write_tfrecord_cifar10_metadata(tmp_path)
    written = sorted(p.name for p in version_dir.iterdir())
    message = tfrecord_copy_error(version_dir)
    # "~/..." had reached tensorflow-datasets as it is, which took it for a folder named "~" in the
    # working directory, found nothing prepared there and began a download.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    given = {"as it is": str(tmp_path), "from the home folder": "~", "as its cifar10 folder": "~/cifar10",
             "as its version folder": str(version_dir)}[spelled]
    with pytest.raises(DataError) as error:
        data_lib.load_cifar10(None, tfds_data_dir=given)
    assert str(error.value).startswith(message)
    assert sorted(p.name for p in version_dir.iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10"]
    # Another folder in the data dir (one made for tensorflow-datasets to prepare CIFAR-10 in) is its own.
    (tmp_path / "fresh").mkdir()
    assert data_lib.tfds_data_dir_of(tmp_path / "fresh") is None
    assert data_lib.tfds_data_dir_of(version_dir) == data_lib.tfds_data_dir_of(tmp_path) == tmp_path


def test_channel_stats_are_the_mean_and_std_of_each_channel_in_units_of_255():
    images = np.random.default_rng(0).integers(0, 256, (5000, 4, 4, 3), dtype=np.uint8)  # two chunks of 4096
    mean, std = data_lib.channel_stats(images)
    np.testing.assert_allclose(mean, images.mean((0, 1, 2)) / 255, rtol=1e-6)
    np.testing.assert_allclose(std, images.std((0, 1, 2)) / 255, rtol=1e-5)
    # Images already scaled to [0, 1] had given a mean 255 times too small, and no images NaN.
    with pytest.raises(ValueError, match=r"channel_stats takes uint8 NHWC images, at least one, got float64"):
        data_lib.channel_stats(images / 255)
    with pytest.raises(ValueError, match=r"at least one, got uint8 with shape \(0, 4, 4, 3\)."):
        data_lib.channel_stats(images[:0])


@pytest.mark.parametrize("given", ["parent", "folder", "archive"])
def test_an_official_copy_given_as_tfds_data_dir_is_refused_before_tfds_runs(tmp_path, given):
    # tensorflow-datasets had downloaded CIFAR-10 beside the copy (offline: retrying for minutes).
    # mock_data stands in for that download, so the old behaviour fails here by not raising.
    tfds = pytest.importorskip("tensorflow_datasets")
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", *synthetic_arrays(20, 10))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    path = {"parent": tmp_path, "folder": folder, "archive": archive}[given]
    message = ("is a file, not tensorflow-datasets' folder; an official CIFAR-10 archive goes in data_dir"
               if given == "archive" else "holds an official CIFAR-10 copy, not tensorflow-datasets' prepared data; "
                                          "give it as data_dir")
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(DataError, match=rf"^tfds_data_dir {re.escape(repr(str(path)))} {message}"):
            data_lib.load_cifar10(None, tfds_data_dir=str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def _arrays(n=4):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    return images, np.arange(n) % 10


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_labels=np.array([0, 1, 2, 10])),
         "The train split has labels outside 0..9 (one per class name), such as 10."),
        (dict(test_labels=np.array([0, -1, 2, 3])),
         "The test split has labels outside 0..9 (one per class name), such as -1."),
        (dict(train_labels=np.arange(3)), "The train split has 4 images but labels of shape (3,) and dtype int64;"),
        (dict(test_labels=np.arange(4.0)), "The test split has 4 images but labels of shape (4,) and dtype float64;"),
        (dict(train_images=np.zeros((4, 32, 32, 3), np.float32)), "The train images must be uint8 RGB values 0..255"),
        (dict(test_images=np.zeros((4, 28, 28), np.uint8)), "The test images must have shape (N, H, W, 3) NHWC"),
        (dict(test_images=np.zeros((4, 28, 28, 3), np.uint8)),
         "The train and test images differ in size: (32, 32, 3) and (28, 28, 3); give one size per dataset."),
        (dict(test_images=np.zeros((0, 32, 32, 3), np.uint8), test_labels=np.arange(0)),
         "The test split has no images."),
        (dict(class_names=("cat",)), "A dataset needs at least two class names, got 1."),
        (dict(class_names="ab"), "The class names are not usable: give one name per class, such as ('cat', 'dog'), "
                                 "not the single string 'ab'."),
        (dict(class_names=("cat", "cat")), "The class names are not usable: each must be distinct, but 'cat' is given "
                                           "more than once."),
        (dict(class_names=("cat", 3)), "The class names are not usable: each must be a non-empty string, but name 1 is 3."),
        (dict(class_names=("cat", "")), "The class names are not usable: each must be a non-empty string, but name 1 "
                                        "is ''."),
        (dict(class_names=None), "The class names are not usable: give a list or tuple of strings, got None."),
    ],
)
def test_a_dataset_built_by_hand_is_checked(change, message):
    # A label outside the classes would have trained on as an all-zero one-hot target.
    images, labels = _arrays()
    fields = dict(train_images=images, train_labels=labels, test_images=images, test_labels=labels,
                  class_names=data_lib.CIFAR10_CLASSES)
    data_lib.Cifar10(**fields)
    with pytest.raises(DataError) as raised:
        data_lib.Cifar10(**{**fields, **change})
    assert str(raised.value).startswith(message)


def test_class_names_given_as_a_list_are_kept_as_a_tuple():
    images, labels = _arrays()
    names = list(data_lib.CIFAR10_CLASSES)
    dataset = data_lib.Cifar10(images, labels, images, labels, class_names=names)
    names[0] = "plane"  # the caller's list changing later does not rename the dataset's classes
    assert dataset.class_names == data_lib.CIFAR10_CLASSES


# ----------------------------------------------------------------------------- augmentation


def _coordinate_images(n):
    """Images whose pixels encode their own (row, col): channel 0 = row + 1, channel 1 = col + 1."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], -1).astype(np.uint8)
    return np.repeat(image[None], n, 0)


def test_random_crop_is_a_zero_padded_shift_within_range():
    images = _coordinate_images(1500)
    out = data_lib.augment_batch(images, np.random.default_rng(0), cutout_prob=0.0, flip=False)
    shifts = set()
    for img in out:
        valid = img[..., 2] == 200
        assert np.all(img[~valid] == 0)  # outside the source image: zero padding
        r, c = np.nonzero(valid)
        dy = int(img[r[0], c[0], 0]) - 1 - r[0]
        dx = int(img[r[0], c[0], 1]) - 1 - c[0]
        assert -4 <= dy <= 4 and -4 <= dx <= 4
        # Every valid pixel is the source pixel shifted by the same offset.
        np.testing.assert_array_equal(img[valid, 0].astype(int) - 1 - r, dy)
        np.testing.assert_array_equal(img[valid, 1].astype(int) - 1 - c, dx)
        assert valid.sum() == (32 - abs(dy)) * (32 - abs(dx))
        shifts.add((dy, dx))
    assert len(shifts) == 81  # all offsets occur


def test_flip_mirrors_columns():
    images = _coordinate_images(200)
    out = data_lib.augment_batch(images, np.random.default_rng(1), padding=0, cutout_prob=0.0, flip=True)
    flipped = out[:, 0, 0, 1] == 32
    assert 60 < flipped.sum() < 140
    np.testing.assert_array_equal(out[flipped], images[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], images[~flipped])


def test_cutout_area_position_and_fill():
    n = 2000
    images = np.full((n, 32, 32, 3), 255, np.uint8)
    fill = (10, 20, 30)
    out = data_lib.augment_batch(images, np.random.default_rng(2), padding=0, flip=False, cutout_prob=1.0, fill=fill)
    areas = []
    for img in out:
        hole = np.all(img == fill, -1)
        assert np.all(img[~hole] == 255)
        r, c = np.nonzero(hole)
        h, w = r.max() - r.min() + 1, c.max() - c.min() + 1
        assert hole.sum() == h * w  # a solid rectangle
        # Clipped only at the border: a side shorter than 16 touches the image edge.
        assert h == 16 or r.min() == 0 or r.max() == 31
        assert w == 16 or c.min() == 0 or c.max() == 31
        assert 8 <= h <= 16 and 8 <= w <= 16  # the centre lies inside the image
        areas.append(h * w)
    areas = np.array(areas)
    # Centre uniform over 32 positions per axis: P(side 16) = 17/32, so P(full 16x16) ~ 0.28.
    assert 0.22 < np.mean(areas == 256) < 0.34
    assert areas.min() == 64  # a corner centre gives 8x8


def test_cutout_probability():
    images = np.full((4000, 32, 32, 3), 255, np.uint8)
    out = data_lib.augment_batch(images, np.random.default_rng(3), padding=0, flip=False, cutout_prob=0.3, fill=(0, 0, 0))
    applied = np.any(out == 0, axis=(1, 2, 3))
    assert 0.27 < applied.mean() < 0.33


def test_cutout_fill_is_zero_after_normalization(real_subset):
    mean, std = real_subset.mean, real_subset.std
    fill = tuple(int(round(v)) for v in mean * 255)
    normalized = data_lib.normalize(np.array(fill, np.uint8).reshape(1, 1, 1, 3), mean, std)
    assert np.all(np.abs(normalized) < 0.5 / 255 / std.min())


def test_normalize_refuses_float_images():
    images = np.full((2, 32, 32, 3), 128, np.uint8)
    normalized = data_lib.normalize(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    np.testing.assert_allclose(normalized, (128 / 255 - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="normalize takes uint8 images"):  # normalizing twice
        data_lib.normalize(normalized, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("mean, std", [
    ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),  # pixel values, as some PyTorch recipes write them
    ((0.49, 0.48, 0.45), (0.0, 0.24, 0.26)),  # a zero std
    ((0.49, 0.48), (0.25, 0.24)),  # two channels for three
    ((float("nan"), 0.48, 0.45), (0.25, 0.24, 0.26)),
])
def test_normalize_refuses_statistics_out_of_its_units(mean, std):
    images = np.full((2, 32, 32, 3), 128, np.uint8)
    with pytest.raises(ValueError, match=r"normalize takes 3 per-channel values each of mean in \[0, 1\] and std in "
                                         r"\(0, 1\], in units of pixel / 255 \(as Cifar10.mean and .std\), got mean"):
        data_lib.normalize(images, mean, std)


def test_augment_is_deterministic_per_seed(real_subset):
    x = real_subset.train_images[:256]
    a = data_lib.augment_batch(x, np.random.default_rng(7))
    b = data_lib.augment_batch(x, np.random.default_rng(7))
    c = data_lib.augment_batch(x, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == x.shape


def test_a_process_share_of_a_batch_is_augmented_as_those_rows_of_the_whole_batch(real_subset):
    x = real_subset.train_images[:64]
    whole = data_lib.augment_batch(x, np.random.default_rng(7), cutout_prob=0.5)
    for rows in (slice(0, 16), slice(16, 48), slice(48, 64)):
        share = data_lib.augment_batch(x[rows], np.random.default_rng(7), cutout_prob=0.5, batch_size=64,
                                       first_row=rows.start)
        np.testing.assert_array_equal(share, whole[rows])


def test_train_batches_of_each_process_join_into_the_batches_of_one(real_subset):
    images, labels = real_subset.train_images[:100], real_subset.train_labels[:100]
    augment = lambda x, rng, **rows: data_lib.augment_batch(x, rng, **rows)  # noqa: E731

    def epoch(rows=slice(None)):
        return list(data_lib.train_batches(images, labels, 32, seed=3, epoch=2, augment=augment, rows=rows))

    one = epoch()
    first, second = epoch(slice(0, 16)), epoch(slice(16, 32))
    assert len(one) == len(first) == len(second) == 3
    for whole, a, b in zip(one, first, second):
        np.testing.assert_array_equal(np.concatenate([a.images, b.images]), whole.images)
        np.testing.assert_array_equal(np.concatenate([a.labels, b.labels]), whole.labels)
        assert len(a.weights) == 16


def test_augment_has_no_per_image_python_loop():
    """The number of Python calls does not grow with the batch (bounded by 81 crop offsets)."""

    def count_calls(n):
        images = np.zeros((n, 32, 32, 3), np.uint8)
        rng = np.random.default_rng(0)
        calls = 0

        def profiler(frame, event, arg):
            nonlocal calls
            if event in ("call", "c_call"):
                calls += 1

        sys.setprofile(profiler)
        try:
            data_lib.augment_batch(images, rng)
        finally:
            sys.setprofile(None)
        return calls

    assert count_calls(4096) == count_calls(16384)


def test_cutout_takes_the_suggested_rounded_mean_as_fill():
    # The fill error message suggests np.round(dataset.mean * 255), a float array of whole values.
    mean = np.array([0.4914, 0.4822, 0.4465])
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    rounded = data_lib.augment_batch(images, np.random.default_rng(1), cutout_prob=1.0, fill=np.round(mean * 255))
    as_ints = data_lib.augment_batch(images, np.random.default_rng(1), cutout_prob=1.0, fill=(125, 123, 114))
    np.testing.assert_array_equal(rounded, as_ints)
    assert np.all(rounded == (125, 123, 114), -1).any()


def test_augment_rejects_wrong_dtype():
    with pytest.raises(ValueError, match="uint8 NHWC"):
        data_lib.augment_batch(np.zeros((2, 32, 32, 3), np.float32), np.random.default_rng(0))


def test_augment_refuses_one_image_without_its_batch_axis():
    with pytest.raises(ValueError, match=r"uint8 NHWC batch, got uint8 with shape \(32, 32, 3\)\.$"):
        data_lib.augment_batch(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0))


def test_augment_of_an_empty_batch_is_empty():
    # It raised a bare IndexError from the gather.
    out = data_lib.augment_batch(np.zeros((0, 32, 32, 3), np.uint8), np.random.default_rng(0))
    assert out.shape == (0, 32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fill=(1, 2)), r"fill takes 3 whole pixel values in 0..255, .*got \(1, 2\)"),
        (dict(fill=(0, 0, 300)), "fill takes 3 whole pixel values in 0..255"),
        (dict(fill=(0.4914, 0.4822, 0.4465)), r"fill takes 3 whole pixel values in 0..255, such as "
                                               r"np.round\(dataset.mean \* 255\), got \(0.4914"),
        (dict(fill=(124.6, 123.0, 114.0)), "fill takes 3 whole pixel values"),
    ],
)
def test_augment_rejects_bad_arguments(kwargs, message):
    # Without these checks a bad fill failed only when some image drew Cutout, and a probability
    # above 1 silently meant 1.
    arguments = dict(rng=np.random.default_rng(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        data_lib.augment_batch(np.zeros((64, 32, 32, 3), np.uint8), **arguments)


@pytest.mark.parametrize("size", [0, 2.5, "2"])
def test_prefetch_needs_a_bounded_queue(size):
    with pytest.raises(ValueError, match=re.escape(f"prefetch size must be a positive integer, got {size!r}.")):
        next(data_lib.prefetch(iter([1, 2]), size=size))


# ----------------------------------------------------------------------------- pipeline


def test_eval_batches_cover_every_example_once():
    labels = np.arange(23, dtype=np.int32)
    images = np.zeros((23, 32, 32, 3), np.uint8)
    batches = list(data_lib.eval_batches(images, labels, 8))
    assert [len(b.labels) for b in batches] == [8, 8, 8]
    seen = np.concatenate([b.labels[b.weights > 0] for b in batches])
    np.testing.assert_array_equal(seen, labels)
    assert batches[-1].weights.sum() == 7


def test_train_batches_shuffle_per_epoch_and_drop_remainder():
    labels = np.arange(50, dtype=np.int32)
    images = np.zeros((50, 32, 32, 3), np.uint8)
    epoch1 = [b.labels for b in data_lib.train_batches(images, labels, 16, seed=0, epoch=1)]
    epoch1_again = [b.labels for b in data_lib.train_batches(images, labels, 16, seed=0, epoch=1)]
    epoch2 = [b.labels for b in data_lib.train_batches(images, labels, 16, seed=0, epoch=2)]
    assert len(epoch1) == 3 and len(np.unique(np.concatenate(epoch1))) == 48
    np.testing.assert_array_equal(np.concatenate(epoch1), np.concatenate(epoch1_again))
    assert not np.array_equal(np.concatenate(epoch1), np.concatenate(epoch2))


@pytest.mark.parametrize("batches", ["train_batches", "eval_batches"])
@pytest.mark.parametrize("batch_size, labels, message", [
    # -1 had given no batches at all (an "every example once" evaluation of nothing), 0 failed in
    # range(), and a short label array in numpy's indexing.
    (-1, 10, "batch_size must be a positive integer, got -1."),
    (0, 10, "batch_size must be a positive integer, got 0."),
    (2.5, 10, "batch_size must be a positive integer, got 2.5."),
    (4, 5, "Give one label per image: 10 images but 5 labels."),
])
def test_batching_refuses_what_cannot_be_batched(batches, batch_size, labels, message):
    images = np.zeros((10, 32, 32, 3), np.uint8)
    arguments = dict(seed=0, epoch=1) if batches == "train_batches" else {}
    with pytest.raises(ValueError, match=re.escape(message)):
        next(getattr(data_lib, batches)(images, np.arange(labels), batch_size, **arguments))


def test_train_batches_refuse_a_batch_larger_than_the_images():
    # The remainder is dropped, so the epoch had ended silently without a batch.
    with pytest.raises(ValueError, match="batch_size 20 exceeds the 10 training images, so an epoch would have no batch."):
        next(data_lib.train_batches(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10), 20, seed=0, epoch=1))


@pytest.mark.parametrize("batches", ["train_batches", "eval_batches"])
def test_batching_refuses_float_images(batches):
    arguments = dict(seed=0, epoch=1) if batches == "train_batches" else {}
    with pytest.raises(ValueError, match=r"Batches take uint8 images \(0..255, normalized later on the device\), "
                                         r"got float32."):
        next(getattr(data_lib, batches)(np.zeros((10, 32, 32, 3), np.float32), np.arange(10), 4, **arguments))


def test_prefetch_preserves_order_and_reraises():
    assert list(data_lib.prefetch(iter(range(10)), transfer=lambda x: x * 2)) == list(range(0, 20, 2))

    def broken():
        yield 1
        raise DataError("bad batch")

    with pytest.raises(DataError, match="bad batch"):
        list(data_lib.prefetch(broken()))

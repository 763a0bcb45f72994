"""CIFAR-10 loading, numpy augmentation and the input pipeline.

Images stay uint8 NHWC on the host; normalization happens on the device inside the jitted
steps (`normalize`), so four times fewer bytes cross to the accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import os
import pickle
import queue
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxcam import image_folder
from jaxcam._checks import check_positive_integer, class_names_problem, is_path
from jaxcam.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# uint8 per-channel mean of the full CIFAR-10 training split: the default cutout fill.
CIFAR10_MEAN_UINT8 = (125, 123, 114)
IMAGE_SHAPE = (32, 32, 3)
_BATCH_FOLDER = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_META_FILE = "batches.meta"
_BATCH_FILES = (*_TRAIN_FILES, _TEST_FILE, _META_FILE)


@dataclasses.dataclass(frozen=True)
class Cifar10:
    """The two splits: images uint8 (N, H, W, 3) RGB (32x32 for CIFAR-10; one size for both
    splits), labels int32 (N,), and class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        problem = class_names_problem(self.class_names)
        if problem is not None:
            raise DataError(f"The class names are not usable: {problem}.")
        object.__setattr__(self, "class_names", tuple(self.class_names))  # a tuple, as the field says
        if len(self.class_names) < 2:
            raise DataError(f"A dataset needs at least two class names, got {len(self.class_names)}.")
        # A dataset built by hand (a notebook's own images) would otherwise train on without a
        # word: a label outside the classes becomes an all-zero one-hot target.
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), np.asarray(getattr(self, f"{split}_labels"))
            try:
                check_images(images, name=f"The {split} images")
            except ValueError as e:
                raise DataError(str(e)) from None
            if len(images) == 0:
                raise DataError(f"The {split} split has no images.")
            if images.shape[1:] != np.shape(self.train_images)[1:]:
                raise DataError(f"The train and test images differ in size: {np.shape(self.train_images)[1:]} "
                                f"and {images.shape[1:]}; give one size per dataset.")
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"The {split} split has {len(images)} images but labels of shape {labels.shape} "
                                f"and dtype {labels.dtype}; give one integer label per image.")
            outside = labels[(labels < 0) | (labels >= len(self.class_names))]
            if outside.size:
                raise DataError(f"The {split} split has labels outside 0..{len(self.class_names) - 1} "
                                f"(one per class name), such as {int(outside[0])}.")

    @property
    def num_classes(self) -> int:
        """K, the number of class names (labels are 0..K-1)."""
        return len(self.class_names)

    @functools.cached_property
    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        return channel_stats(self.train_images)  # one pass over the training split, then cached

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean of the training images in [0, 1], float32 (3,)."""
        return self._stats[0]

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation of the training images in [0, 1], float32 (3,)."""
        return self._stats[1]


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of uint8 NHWC images scaled to [0, 1], each float32 (C,).

    Accumulates in float64 chunk by chunk so 50k images need no 600 MB float copy.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        # Float images in [0, 1] would have given a mean 255 times too small; none, NaN.
        raise ValueError(f"channel_stats takes uint8 NHWC images, at least one, got {images.dtype} with shape "
                         f"{images.shape}.")
    count = 0
    total = np.zeros(images.shape[-1], np.float64)
    total_sq = np.zeros(images.shape[-1], np.float64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].reshape(-1, images.shape[-1]).astype(np.float64)
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
        count += len(chunk)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


# ----------------------------------------------------------------------------- loading


def load_cifar10(data_dir: str | os.PathLike | None = None, *, tfds_data_dir: str | None = None) -> Cifar10:
    """Load CIFAR-10 as uint8 NHWC arrays with int32 labels and the class names.

    `data_dir=None` reads tensorflow-datasets' prepared `cifar10` (array_record; downloaded
    and prepared on first use, which needs TensorFlow once; a copy prepared as TFRecord is read
    through TensorFlow) from `tfds_data_dir` (None: tfds' default; also its `cifar10/` folder).
    Otherwise `data_dir` is a local copy in the official python format: `cifar-10-python.tar.gz`,
    its extracted `cifar-10-batches-py/` folder, or a directory holding either. Raises `DataError`
    with one clear sentence when the data is missing or malformed.
    """
    for name, value, none_reads in (("data_dir", data_dir, "tensorflow-datasets"),
                                    ("tfds_data_dir", tfds_data_dir, "tensorflow-datasets' default folder")):
        if value is not None and not is_path(value):
            raise DataError(f"{name} must be a path (a string or os.PathLike) or None, got {value!r}.")
        # An empty string (`--config.tfds_data_dir=$DIR` with DIR unset) would mean the working
        # directory: tfds would begin downloading CIFAR-10 into it, even with a copy prepared elsewhere.
        if value == "":
            raise DataError(f"{name} is an empty string; give a path, or None for {none_reads}.")
    if data_dir is None:
        return _load_tfds(tfds_data_dir)
    return _load_local(Path(data_dir).expanduser())


def _load_local(path: Path) -> Cifar10:
    if not path.exists():
        raise DataError(f"Data path {str(path)!r} does not exist.")
    if image_folder.is_image_folder(path):
        return image_folder.load_image_folder(path)
    if path.is_file():
        return _load_archive(path)
    found = _official_copy_in(path)
    if found is not None:
        return _load_folder(found) if found.is_dir() else _load_archive(found)
    raise image_folder.neither_layout(path)


def _official_copy_in(folder: Path) -> Path | None:
    """The official copy in `folder`: the folder of batch files (itself or its cifar-10-batches-py/),
    else its cifar-10-python.tar.gz; None if it holds neither."""
    for candidate in (folder, folder / _BATCH_FOLDER):
        if (candidate / _TEST_FILE).exists() or (candidate / _META_FILE).exists():
            return candidate
    if (folder / _ARCHIVE).is_file():
        return folder / _ARCHIVE
    return None


def tfds_data_dir_of(path: str | os.PathLike) -> Path | None:
    """The tensorflow-datasets data dir that `path` is, or lies in (as its cifar10/ or
    cifar10/<version>/ folder), when it holds a prepared cifar10; None for a path that holds an
    official copy (which `load_cifar10(path)` reads) or neither."""
    path = Path(path).expanduser()
    if path.is_file() or _official_copy_in(path) is not None:
        return None
    # Only the folders of cifar10 itself lead up: another folder in a data dir (an empty one made
    # for tfds to prepare CIFAR-10 in, say) is not taken for that data dir.
    folder = Path(os.path.abspath(path))  # "." has no parents of its own
    up = 1 if folder.name == "cifar10" else 2 if folder.parent.name == "cifar10" else 0
    root = folder.parents[up - 1] if up else path
    with contextlib.suppress(OSError):
        if any((root / "cifar10").glob("*/dataset_info.json")):
            return root
    return None


def _load_folder(folder: Path) -> Cifar10:
    def read(name: str) -> bytes:
        file = folder / name
        if not file.is_file():
            raise DataError(f"CIFAR-10 folder {str(folder)!r} is missing the file {name!r}.")
        return file.read_bytes()

    return _assemble(read, str(folder))


def _load_archive(archive: Path) -> Cifar10:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            contents: dict[str, bytes] = {}
            for name in _BATCH_FILES:
                if name in members:
                    contents[name] = tar.extractfile(members[name]).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        # tarfile's "r:*" error lists every compression it tried, one per line: keep one sentence.
        detail = _first_line(e) or type(e).__name__
        if detail.endswith(":"):
            detail = "not a gzip, bzip2, xz or plain tar archive"
        raise DataError(f"CIFAR-10 archive {str(archive)!r} is not a readable tar.gz file ({detail}).") from None

    def read(name: str) -> bytes:
        if name not in contents:
            raise DataError(f"CIFAR-10 archive {str(archive)!r} has no member {name!r}.")
        return contents[name]

    return _assemble(read, str(archive))


def _unpickle_batch(raw: bytes, name: str, source: str) -> dict[str, Any]:
    try:
        batch = pickle.load(io.BytesIO(raw), encoding="bytes")
    except Exception as e:  # truncated or foreign bytes raise many different errors
        raise DataError(
            f"{name} in {source!r} is truncated or not a CIFAR-10 batch file ({type(e).__name__})."
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{name} in {source!r} is not a CIFAR-10 batch file (no dictionary inside).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(raw: bytes, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_batch(raw, name, source)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{name} in {source!r} lacks the 'data' or 'labels' entry of a CIFAR-10 batch.")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{name} in {source!r} holds data of shape {data.shape} and dtype {data.dtype}; "
            "CIFAR-10 batches hold uint8 rows of 3072 values."
        )
    if labels.shape != (len(data),):
        raise DataError(f"{name} in {source!r} has {len(data)} images but {labels.size} labels.")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        # Strings made min() raise numpy's UFuncTypeError; floats were truncated to classes unseen.
        raise DataError(f"{name} in {source!r} has labels of dtype {labels.dtype}; CIFAR-10 labels are integers 0..9.")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{name} in {source!r} has labels outside 0..9.")
    # Channel-planar rows (3 x 32 x 32) to NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _assemble(read: Callable[[str], bytes], source: str) -> Cifar10:
    train = [_read_batch(read(name), name, source) for name in _TRAIN_FILES]
    test_images, test_labels = _read_batch(read(_TEST_FILE), _TEST_FILE, source)
    class_names = CIFAR10_CLASSES
    try:
        meta = _unpickle_batch(read(_META_FILE), _META_FILE, source)
        names = meta.get("label_names")
        if isinstance(names, (list, tuple)) and len(names) == 10:
            names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
            if class_names_problem(names) is None:
                class_names = tuple(names)
    except DataError:
        pass
    # The names are also the published constant, so a meta file that is missing, or damaged
    # (a repeated or empty name), loses nothing: the published names serve instead.
    return Cifar10(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


def _hide_gpus_from_tensorflow() -> None:
    """Preparing the dataset imports TensorFlow, which would reserve GPU memory that JAX then
    lacks; as Flax's examples do, TensorFlow is shown no GPU (it needs none to prepare data)."""
    if importlib.util.find_spec("tensorflow") is None:
        return  # tensorflow-datasets then says that preparing needs it
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # raised once TensorFlow has set up its GPUs: too late
        tf.config.set_visible_devices([], "GPU")


def _load_tfds(tfds_data_dir: str | os.PathLike | None) -> Cifar10:
    if tfds_data_dir is not None:
        # tensorflow-datasets takes "~/tensorflow_datasets" for a folder named "~" in the working
        # directory, and looks for cifar10/ inside a prepared copy's own cifar10/ or cifar10/<version>/
        # given for its data dir; finding none prepared, it downloads CIFAR-10 there.
        path = Path(tfds_data_dir).expanduser()
        path = tfds_data_dir_of(path) or path
        tfds_data_dir = str(path)
        # An official copy given as tfds_data_dir: tensorflow-datasets would download CIFAR-10
        # beside it (offline: retrying for minutes) instead of reading it.
        if path.is_file():
            raise DataError(f"tfds_data_dir {str(path)!r} is a file, not tensorflow-datasets' folder; an official "
                            "CIFAR-10 archive goes in data_dir (--config.data_dir).")
        if _official_copy_in(path) is not None:
            raise DataError(f"tfds_data_dir {str(path)!r} holds an official CIFAR-10 copy, not tensorflow-datasets' "
                            "prepared data; give it as data_dir (--config.data_dir) instead.")
    import tensorflow_datasets as tfds

    builder = None
    with contextlib.suppress(Exception):  # a builder that cannot be made fails in data_source, in its words
        builder = tfds.builder("cifar10", data_dir=tfds_data_dir)
    prepared = builder is not None and builder.is_prepared()
    if prepared and not _random_access_formats(builder.info):
        # Prepared by tfds.load's default, TFRecord (in ~/tensorflow_datasets since an earlier project,
        # say): only TensorFlow reads it. Asking data_source for array_record there is an error.
        if importlib.util.find_spec("tensorflow") is None:
            raise DataError(f"CIFAR-10 in {str(builder.data_dir)!r} was prepared as TFRecord files, which only "
                            "TensorFlow reads: install it (pip install tensorflow) or give --config.tfds_data_dir "
                            "another folder, where tensorflow-datasets prepares CIFAR-10 as array_record.")
        _hide_gpus_from_tensorflow()
        read_split = functools.partial(_read_tfrecord_split, builder)
    else:
        if not prepared and builder is not None:
            # Say why the first run waits (a download and a preparation), and what to do offline,
            # where tensorflow-datasets retries for minutes before it fails.
            print(f"CIFAR-10 is not prepared in {str(builder.data_dir)!r} yet: tensorflow-datasets downloads "
                  "(163 MB) and prepares it once, which needs internet and TensorFlow; offline, pass a local "
                  "copy with --config.data_dir.", file=sys.stderr)
            _hide_gpus_from_tensorflow()
        read_split = functools.partial(_read_data_source_split, tfds_data_dir)
    splits = {}
    for split in ("train", "test"):
        images, labels, names = read_split(split)
        if images.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"tensorflow-datasets cifar10 {split} images have shape {images.shape[1:]}, expected {IMAGE_SHAPE}.")
        splits[split] = (images, labels)
    return Cifar10(*splits["train"], *splits["test"], class_names=names)


def _random_access_formats(info: Any) -> set:
    """The formats of a prepared tensorflow-datasets copy that `tfds.data_source` reads."""
    from tensorflow_datasets.core import file_adapters

    return info.available_file_formats() & set(file_adapters.FileFormat.with_random_access())


def _first_line(error: Exception) -> str:
    """The first line of an error's message ('' for none): one sentence of a long report."""
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def _read_data_source_split(tfds_data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split through `tfds.data_source`, which reads (and prepares) array_record image by image
    without TensorFlow: images (N, 32, 32, 3) uint8, labels (N,) int32 and the class names."""
    import tensorflow_datasets as tfds

    try:
        records = tfds.data_source("cifar10", split=split, data_dir=tfds_data_dir,
                                   builder_kwargs={"file_format": "array_record"})
    except Exception as e:
        raise DataError(
            f"Could not load CIFAR-10 from tensorflow-datasets ({type(e).__name__}: {_first_line(e)}); preparing "
            "it needs TensorFlow and internet once, or pass a local copy with --config.data_dir."
        ) from None
    # Decode every record once into one uint8 NHWC array (the data source decodes the PNGs;
    # 60k small images take a few seconds).
    items = [records[i] for i in range(len(records))]
    images = np.stack([np.asarray(item["image"], np.uint8) for item in items])
    labels = np.asarray([int(item["label"]) for item in items], np.int32)
    return images, labels, tuple(records.dataset_info.features["label"].names)


def _read_tfrecord_split(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split of a copy prepared as TFRecord, through TensorFlow (which the caller found and
    showed no GPU): as `_read_data_source_split`."""
    import tensorflow_datasets as tfds

    try:
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except Exception as e:
        raise DataError(f"Could not read CIFAR-10's TFRecord files in {str(builder.data_dir)!r} "
                        f"({type(e).__name__}: {_first_line(e)}).") from None
    return (np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32),
            tuple(builder.info.features["label"].names))


def check_images(images: Any, *, name: str = "images") -> np.ndarray:
    """Validate a uint8 (N, H, W, 3) batch; raise ValueError with one clear sentence if not."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB values 0..255, got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, H, W, 3) NHWC, got {images.shape}.")
    return images


# ----------------------------------------------------------------------------- augmentation


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    padding: int = 4,
    cutout_size: int = 16,
    cutout_prob: float = 0.5,
    fill: Sequence[int] = CIFAR10_MEAN_UINT8,
    flip: bool = True,
    batch_size: int | None = None,
    first_row: int = 0,
) -> np.ndarray:
    """RandomCrop(32, padding) with zeros, optional horizontal flip, Cutout; uint8 NHWC in and out.

    With `batch_size`, `images` are rows `first_row`.. of a batch of `batch_size` (one process's
    share of a global batch): the draws are made for the whole batch and these rows come out as
    they would from augmenting it whole, whichever process builds them.

    Vectorized over the batch: images are gathered once in the order of their (flip, crop
    offset) draws, flipped ones mirrored in that gather (flip(crop(x, dy, dx)) equals
    crop(flip(x), dy, 2 * padding - dx)), each run of equal offsets is one contiguous slice
    copy (at most 2 * (2 * padding + 1)^2 of them, however large the batch), Cutout is one
    masked copy over rows of W*C bytes, and one scatter restores the input order.
    Cutout follows DeVries & Taylor: a `cutout_size` square whose centre is uniform over the
    image, clipped at the border, applied with probability `cutout_prob`, filled with `fill`
    (whole pixel values 0..255: the dataset mean, so 0 after normalization). Deterministic for
    a given `rng` state.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"augment_batch takes a uint8 NHWC batch, got {images.dtype} with shape {images.shape}.")
    n, h, w, c = images.shape
    fill_values = np.asarray(fill)
    if fill_values.shape != (c,) or (fill_values != np.round(fill_values)).any() or not (
            (fill_values >= 0) & (fill_values <= 255)).all():
        # Cifar10.mean is in 0..1: passed as it is, it would cut out black squares.
        raise ValueError(f"fill takes {c} whole pixel values in 0..255, such as np.round(dataset.mean * 255), "
                         f"got {fill!r}.")
    draws = n if batch_size is None else batch_size
    # All random draws first, in a fixed order, so results depend only on the rng state.
    offsets = rng.integers(0, 2 * padding + 1, size=(draws, 2)) if padding else np.zeros((draws, 2), np.int64)
    flips = rng.random(draws) < 0.5 if flip else np.zeros(draws, bool)
    centres = rng.integers(0, (h, w), size=(draws, 2))
    apply_cutout = rng.random(draws) < cutout_prob if cutout_size > 0 else np.zeros(draws, bool)
    rows = slice(first_row, first_row + n)
    offsets, flips, centres, apply_cutout = offsets[rows], flips[rows], centres[rows], apply_cutout[rows]
    if n == 0:
        return images.copy()  # the gather below needs at least one image

    dy = offsets[:, 0]
    dx = np.where(flips, 2 * padding - offsets[:, 1], offsets[:, 1])  # the offset in the mirrored image
    side = 2 * padding + 1
    codes = (flips * side + dy) * side + dx
    order = np.argsort(codes, kind="stable")
    n_plain = n - int(flips.sum())
    padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), np.uint8)
    inner = padded[:, padding : padding + h, padding : padding + w]
    inner[:n_plain] = images[order[:n_plain]]
    if n_plain < n:
        # Mirror whole pixels (c bytes as one void item): twice as fast as a uint8 reversed copy.
        pixels = f"V{c}"
        inner[n_plain:].view(pixels)[..., 0] = images[order[n_plain:]].view(pixels)[..., 0][:, :, ::-1]
    out = np.empty_like(images)
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    for start, end in zip(starts.tolist(), np.r_[starts[1:], n].tolist()):
        y, x = dy[order[start]], dx[order[start]]
        out[start:end] = padded[start:end, y : y + h, x : x + w]

    if apply_cutout.any():
        half = cutout_size // 2
        cy, cx = centres[order, 0], centres[order, 1]
        rows, cols = np.arange(h), np.repeat(np.arange(w), c)  # a column per byte of a row
        in_rows = (rows >= cy[:, None] - half) & (rows < cy[:, None] + half) & apply_cutout[order, None]
        in_cols = (cols >= cx[:, None] - half) & (cols < cx[:, None] + half)
        np.copyto(out.reshape(n, h, w * c), np.tile(fill_values.astype(np.uint8), w),
                  where=in_rows[:, :, None] & in_cols[:, None, :])
    restored = np.empty_like(out)
    restored[order] = out
    return restored


def normalize(images: Any, mean: Sequence[float], std: Sequence[float], dtype: Any = None) -> Any:
    """uint8 NHWC -> (x / 255 - mean) / std as float32 (or `dtype`); works on numpy and jax arrays.

    `mean` and `std` are per-channel in [0, 1]. Run inside jit so it happens on the device.
    """
    import jax.numpy as jnp

    if getattr(images, "dtype", None) != np.uint8:
        # Float images are most likely normalized already; a second pass would silently skew them.
        raise ValueError(f"normalize takes uint8 images (0..255), got {getattr(images, 'dtype', type(images).__name__)}.")
    mean_values, std_values = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    channels = images.shape[-1]
    # The range tests also refuse NaN, which compares false.
    if (mean_values.shape != (channels,) or std_values.shape != (channels,)
            or not ((mean_values >= 0) & (mean_values <= 1) & (std_values > 0) & (std_values <= 1)).all()):
        # PyTorch recipes also write the mean in pixel values (125.3, 123.0, 113.9); taken as it is,
        # every image would come out a flat, hugely negative array without a word.
        raise ValueError(f"normalize takes {channels} per-channel values each of mean in [0, 1] and std in (0, 1], "
                         f"in units of pixel / 255 (as Cifar10.mean and .std), got mean {mean!r} and std {std!r}.")
    xp = jnp if not isinstance(images, np.ndarray) else np
    scale = xp.asarray(1.0 / (255.0 * std_values), np.float32)
    shift = xp.asarray(mean_values / std_values, np.float32)
    out = images.astype(np.float32) * scale - shift
    return out.astype(dtype) if dtype is not None else out


# ----------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class Batch:
    """A host batch: uint8 images (B, 32, 32, 3), int32 labels (B,), float32 weights (B,).

    `weights` is 0 for padding rows that only fill the last evaluation batch.
    """

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


def _check_batching(images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    """ValueError unless the images are uint8, `batch_size` is a positive integer and there is one
    label per image."""
    dtype = getattr(images, "dtype", None)
    if dtype != np.uint8:
        # Normalization runs on the device after batching; float images in [0, 1] would be
        # normalized as if they were pixel values, without a word.
        raise ValueError(f"Batches take uint8 images (0..255, normalized later on the device), got {dtype}.")
    # A negative one gave no batches at all: an "every example once" evaluation of nothing.
    check_positive_integer(batch_size, "batch_size")
    if len(images) != len(labels):
        raise ValueError(f"Give one label per image: {len(images)} images but {len(labels)} labels.")


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: Callable[..., np.ndarray] | None = None,
    rows: slice = slice(None),
) -> Iterator[Batch]:
    """One epoch of shuffled, augmented training batches; the last partial batch is dropped.

    The shuffle and the augmentation draw from `np.random.default_rng([seed, epoch])`, so an
    epoch is the same whether or not the run was resumed before it. With `rows`, each batch is
    only those rows of the global batch of `batch_size` (one process's share); `augment(images,
    rng, batch_size=, first_row=)` (as `augment_batch` takes them) draws for the whole batch, so
    the rows do not depend on which process builds them.
    """
    _check_batching(images, labels, batch_size)
    if batch_size > len(images):
        # The remainder is dropped, so the epoch would end without a single batch.
        raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} training images, so an epoch would "
                         "have no batch.")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        # Sorted reads are faster; the order inside a batch is irrelevant.
        idx = np.sort(order[start : start + batch_size])[rows]
        batch_images = images[idx]
        if augment is not None:
            batch_images = augment(batch_images, rng, batch_size=batch_size, first_row=rows.start or 0)
        yield Batch(batch_images, labels[idx], np.ones(len(idx), np.float32))


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Every example exactly once, in order; the last batch is padded to `batch_size` with weight 0."""
    _check_batching(images, labels, batch_size)
    for start in range(0, len(images), batch_size):
        batch_images = images[start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        weights = np.ones(len(batch_images), np.float32)
        pad = batch_size - len(batch_images)
        if pad:
            batch_images = np.concatenate([batch_images, np.zeros((pad, *batch_images.shape[1:]), batch_images.dtype)])
            batch_labels = np.concatenate([batch_labels, np.zeros(pad, batch_labels.dtype)])
            weights = np.concatenate([weights, np.zeros(pad, np.float32)])
        yield Batch(batch_images, batch_labels, weights)


def prefetch(iterator: Iterator[Any], transfer: Callable[[Any], Any] = lambda x: x, size: int = 2) -> Iterator[Any]:
    """Run `iterator` and `transfer` (e.g. a sharded `jax.device_put`) on a background thread.

    Up to `size` items are prepared ahead, so the step never waits for augmentation or the
    host-to-device copy. Exceptions in the producer re-raise in the consumer.
    """
    # queue.Queue(0) would be unbounded: a whole epoch of batches could pile up on the device.
    check_positive_integer(size, "prefetch size")
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(transfer(item))
        except BaseException as e:  # surfaced to the consumer below
            items.put(e)
            return
        items.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue so the thread can end.
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)

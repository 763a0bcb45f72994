"""Image-folder datasets (train/<class>/<image>, test/ or val/), in folders and archives, and their cache."""

import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import explain as explain_cli
import train as train_cli
from conftest import ROOT
from jaxcam import data as data_lib
from jaxcam import rundir
from jaxcam.errors import DataError

# Not in sorted order on purpose: labels follow the sorted folder names, as torchvision's ImageFolder.
CLASSES = ("cat", "ant", "bee")


def write_image_folder(root, per_class=4, test_folder="test", size=(32, 32), seed=0, classes=CLASSES):
    """train/ and test/ (or val/) with `per_class` images per class, PNG for even and JPEG for odd
    indices; returns {relative path: the pixels written}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in (("train", per_class), (test_folder, per_class // 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                # Smooth pictures (4x4 random colours, upsampled), which JPEG keeps close.
                coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                pixels = np.asarray(coarse.resize(size, Image.Resampling.BILINEAR))
                relative = f"{split}/{name}/{i:04d}.{'png' if i % 2 == 0 else 'jpg'}"
                Image.fromarray(pixels).save(root / relative)
                written[relative] = pixels
    return written


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test decodes into a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def decoded(capsys) -> bool:
    """Whether the load just done decoded files (rather than reading the cache)."""
    return "Decoding the" in capsys.readouterr().out


def test_a_folder_reads_with_sorted_class_names_and_exact_pngs(tmp_path, capsys):
    written = write_image_folder(tmp_path / "pets")
    dataset = data_lib.load_cifar10(tmp_path / "pets")
    assert decoded(capsys)
    assert dataset.class_names == ("ant", "bee", "cat") and dataset.num_classes == 3
    assert dataset.train_images.shape == (12, 32, 32, 3) and dataset.test_images.shape == (6, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8 and list(dataset.train_labels) == [0] * 4 + [1] * 4 + [2] * 4
    # Within a class, files in name order: ant's 0000.png is the first training image, exactly.
    np.testing.assert_array_equal(dataset.train_images[0], written["train/ant/0000.png"])
    np.testing.assert_array_equal(dataset.test_images[-2], written["test/cat/0000.png"])
    # JPEG is lossy: close to, not equal to, what was written.
    jpeg = dataset.train_images[1].astype(int) - written["train/ant/0001.jpg"]
    assert 0 < np.abs(jpeg).mean() < 40
    np.testing.assert_allclose(dataset.mean, dataset.train_images.reshape(-1, 3).mean(0) / 255, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip", "wrapped tar.gz", "val"])
def test_archives_and_val_folders_read_as_the_folder_does(tmp_path, kind):
    folder = tmp_path / "pets"
    write_image_folder(folder, test_folder="val" if kind == "val" else "test")
    expected = data_lib.load_cifar10(folder)
    if kind == "val":
        assert expected.test_images.shape == (6, 32, 32, 3)
        return
    archive = tmp_path / f"pets.{kind.split()[-1]}"
    top = "pets/" if kind.startswith("wrapped") else ""  # a folder around the dataset, as archives often have
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in sorted(folder.rglob("*")):
                zipped.write(path, top + path.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz" if kind.endswith("gz") else "w") as tar:
            for split in ("train", "test"):
                tar.add(folder / split, arcname=top + split)
    dataset = data_lib.load_cifar10(archive)
    assert dataset.class_names == expected.class_names
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(dataset, f"{split}_images"), getattr(expected, f"{split}_images"))
        np.testing.assert_array_equal(getattr(dataset, f"{split}_labels"), getattr(expected, f"{split}_labels"))


def test_the_second_read_loads_the_cache_and_a_changed_source_is_decoded_again(tmp_path, capsys):
    folder = tmp_path / "pets"
    write_image_folder(folder)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="pets")
    for source in (folder, archive):
        first = data_lib.load_cifar10(source)
        assert decoded(capsys)
        again = data_lib.load_cifar10(source)
        assert not decoded(capsys)
        np.testing.assert_array_equal(again.train_images, first.train_images)
        assert again.class_names == first.class_names
    assert len(list((tmp_path / "cache" / "jaxcam" / "datasets").glob("*.npz"))) == 2
    # One image changed: only the folder's key changes, and its new pixels are read.
    new_pixels = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(new_pixels).save(folder / "train" / "ant" / "0000.png")
    os.utime(folder / "train" / "ant" / "0000.png", ns=(1, 1))  # a different mtime, whatever the clock's grain
    changed = data_lib.load_cifar10(folder)
    assert decoded(capsys)
    np.testing.assert_array_equal(changed.train_images[0], new_pixels)
    data_lib.load_cifar10(archive)
    assert not decoded(capsys)
    # A rewritten archive is decoded again too.
    shutil.copy(archive, tmp_path / "copy.tar.gz")
    os.replace(tmp_path / "copy.tar.gz", archive)
    data_lib.load_cifar10(archive)
    assert decoded(capsys)


def test_train_and_test_with_other_classes_are_refused(tmp_path):
    write_image_folder(tmp_path / "pets")
    shutil.rmtree(tmp_path / "pets" / "test" / "bee")
    (tmp_path / "pets" / "test" / "wasp").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pets" / "test" / "wasp" / "0.png")
    with pytest.raises(DataError, match=r"^The class folders of train/ and test/ in .* differ: only train/ has bee; "
                                        r"only test/ has wasp\.$"):
        data_lib.load_cifar10(tmp_path / "pets")


def test_an_empty_class_folder_is_refused(tmp_path):
    write_image_folder(tmp_path / "pets")
    for image in (tmp_path / "pets" / "train" / "bee").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"^The class folder train/bee in .* holds no images\.$"):
        data_lib.load_cifar10(tmp_path / "pets")


def test_a_file_pillow_cannot_decode_is_named(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "test" / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"^'test/cat/notes.jpg' in .* is not an image Pillow can read "
                                        r"\(UnidentifiedImageError\)\.$"):
        data_lib.load_cifar10(tmp_path / "pets")


def test_images_of_different_sizes_are_refused_naming_one_of_each(tmp_path):
    write_image_folder(tmp_path / "pets")
    Image.new("RGB", (48, 40)).save(tmp_path / "pets" / "train" / "bee" / "0002.png")
    with pytest.raises(DataError, match=r"^The images of .* differ in size: 'train/ant/0000.png' is 32x32 but "
                                        r"'train/bee/0002.png' is 48x40; give one size per dataset\.$"):
        data_lib.load_cifar10(tmp_path / "pets")


def test_one_size_other_than_32_is_a_dataset_of_that_size(tmp_path):
    write_image_folder(tmp_path / "pets", size=(24, 24))
    assert data_lib.load_cifar10(tmp_path / "pets").train_images.shape == (12, 24, 24, 3)


@pytest.mark.parametrize("layout", ["no test folder", "flat files", "unrelated"])
def test_a_folder_of_neither_layout_is_refused(tmp_path, layout):
    folder = tmp_path / "data"
    if layout == "no test folder":
        write_image_folder(folder)
        shutil.rmtree(folder / "test")
    elif layout == "flat files":
        (folder / "train").mkdir(parents=True)
        (folder / "test").mkdir()
        Image.new("RGB", (32, 32)).save(folder / "train" / "a.png")
    else:
        (folder / "photos" / "2024").mkdir(parents=True)
    with pytest.raises(DataError, match=r"is neither an official CIFAR-10 copy \(.*\) nor an image-folder dataset "
                                        r"\(train/<class>/<image> and test/<class>/<image>\)\.$"):
        data_lib.load_cifar10(folder)


def test_train_py_and_explain_py_take_an_image_folder_archive(tmp_path, capsys):
    # Ten classes and the shapes of the suite's other tiny runs, so that the compiled steps are shared.
    folder = tmp_path / "pets"
    write_image_folder(folder, classes=("yak", "ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "owl"))
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="pets")
    code = train_cli.main(["--workdir", str(tmp_path / "runs"), "--config", str(ROOT / "configs" / "smoke.py"),
                           "--config.width=4", "--config.epochs=1", "--config.batch_size=32",
                           "--config.eval_batch_size=16", "--config.tensorboard=False",
                           f"--config.data_dir={str(archive)!r}"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == [1]
    code = explain_cli.main(["--workdir", str(run_dir), "--out", str(tmp_path / "r"), "--num", "4",
                             "--faithfulness", "0"])
    assert code == 0, capsys.readouterr().err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| ant |" in report and "| yak |" in report and "| airplane |" not in report

import dataclasses
import json
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from PIL import Image

import explain as explain_cli
from conftest import (ROOT, cli_command, once_present, sigterm_once, tfrecord_copy_error, write_official_batches,
                      write_tfrecord_cifar10_metadata)
from jaxcam import cam
from jaxcam.checkpoint import Checkpointer, load_variables
from jaxcam.configuration import load_config_file
from jaxcam.data import DataError, load_cifar10
from jaxcam.explain import (REQUIRED_FILES, explain_image_files, explain_images, explain_run, load_image_files,
                            load_run)
from jaxcam.train import train_and_evaluate


def run(args, capsys):
    code = explain_cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory, capsys_module=None):
    out = tmp_path_factory.mktemp("report")
    image = tmp_path_factory.mktemp("mine") / "mine.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(image)
    code = explain_cli.main(["--workdir", str(smoke_run), "--out", str(out), "--num", "4", "--images", str(image),
                             "--faithfulness", "8"])
    assert code == 0
    return out


def test_every_promised_file_is_a_sensible_png(report):
    for name in REQUIRED_FILES + ("per_class_accuracy.png", "samples.png", "custom_images.png"):
        path = report / name
        assert path.is_file(), name
        if name.endswith(".png"):
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.format == "PNG" and img.width >= 300 and img.height >= 250, (name, img.size)
                pixels = np.asarray(img.convert("RGB"))
                assert pixels.std() > 10, f"{name} looks blank"


def test_report_markdown_and_html(report):
    text = (report / "report.md").read_text()
    for name in REQUIRED_FILES[:-1]:
        assert f"]({name})" in text
    assert "Test accuracy" in text and "| airplane |" in text and "deletion AUC" in text and "random baseline" in text
    assert "## Faithfulness (the first 8 test images, predicted class)" in text
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 8 and 'src="curves.png"' not in html
    # Every list item sits in a list, and the summary's items share one.
    from html.parser import HTMLParser

    class Lists(HTMLParser):
        open_lists, items, stray = 0, [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "ul":
                self.open_lists += 1
                self.items.append(0)
            elif tag == "li":
                if self.open_lists:
                    self.items[-1] += 1
                else:
                    self.stray += 1

        def handle_endtag(self, tag):
            self.open_lists -= tag == "ul"

    lists = Lists()
    lists.feed(html)
    assert lists.stray == 0 and lists.open_lists == 0 and lists.items[0] >= 4


def test_own_images_print_top3(smoke_run, tmp_path, capsys):
    image = tmp_path / "cat.jpg"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(image)
    code, out, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", "--images", image, "--faithfulness", "0",
                          "--layer", "layer2"], capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith(str(image)))
    assert line.count("%") == 3


def test_one_image_file_given_alone_is_explained_as_one(smoke_run, tmp_path):
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(image)
    lines = []
    out = explain_image_files(smoke_run, str(image), tmp_path / "mine", log=lines.append)
    assert (out / "custom_images.png").exists()
    assert [line for line in lines if line.startswith(str(image))] and not [l for l in lines if l.startswith("/:")]
    assert len([line for line in lines if "%" in line]) == 1


def test_a_new_report_removes_the_galleries_of_an_earlier_one_that_it_does_not_draw(smoke_run, tmp_path, capsys):
    image, out = tmp_path / "cat.png", tmp_path / "r"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(image)
    settings = ["--workdir", smoke_run, "--out", out, "--num", "2", "--faithfulness", "0"]
    code, _, err = run([*settings, "--images", image, "--layer", "layer1"], capsys)
    assert code == 0, err
    assert {"gradcam_layer1.png", "custom_images.png"} <= {p.name for p in out.iterdir()}
    (out / "my_notes.txt").write_text("mine")  # what jaxcam did not write stays
    (out / "my_plot.png").write_bytes(b"mine")
    (out / "gradcam_layer1_v2.png").write_bytes(b"mine")  # close to jaxcam's names, but not one of them
    code, _, err = run([*settings, "--layer", "layer4"], capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "gradcam_layer4.png" in names and "gradcam_layer1.png" not in names and "custom_images.png" not in names
    assert [(out / name).read_bytes() for name in ("my_notes.txt", "my_plot.png", "gradcam_layer1_v2.png")] == [b"mine"] * 3
    assert not [name for name in names if name.startswith(".report-")]


def test_own_images_are_explained_for_their_two_most_likely_classes(smoke_run):
    run = load_run(smoke_run)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs, classes, cams = explain_images(run, images, layer="layer2", top=2)
    assert probs.shape == (3, 10) and classes.shape == (3, 2) and cams.shape == (3, 2, 32, 32)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    ranked = np.take_along_axis(probs, classes, 1)
    assert (classes[:, 0] != classes[:, 1]).all() and (ranked[:, 0] >= ranked[:, 1]).all()
    assert (ranked[:, 1] >= np.delete(probs, classes[:, 0], 1).max(1) - 1e-7).all()  # really the runner-up
    for rank in range(2):  # each map is the one the CAM core gives for that class alone
        expected = cam.compute(run.model, run.variables, run.normalize(images), layer="layer2", targets=classes[:, rank])
        np.testing.assert_allclose(cams[:, rank], expected, atol=1e-5)
    with pytest.raises(ValueError, match="top must be between 1 and 10"):
        explain_images(run, images, top=11)


def test_own_images_that_cannot_be_explained_get_one_sentence(smoke_run):
    run = load_run(smoke_run)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="top must be between 1 and 10, got 2.5"):
        explain_images(run, images, top=2.5)
    with pytest.raises(ValueError, match=r"shape \(N, H, W, 3\) NHWC, got \(2, 3, 32, 32\)."):
        explain_images(run, images.transpose(0, 3, 1, 2))
    with pytest.raises(DataError, match="Give at least one image file to explain."):
        load_image_files([])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--images", "/nonexistent.png"], "does not exist"),
        (["--images", "/"], "'/' is a folder, not an image file; name the PNG or JPEG files in it."),
        (["--images-only"], "--images-only explains your own images; name them with --images."),
        (["--images-only", "--images", "/nonexistent.png"], "does not exist"),
        (["--images-only", "--images", "/x.png", "--num", "4"],
         "--num sets up the test-set report, which --images-only does not write."),
        (["--images-only", "--images", "/x.png", "--num", "4", "--faithfulness", "0"],
         "--num and --faithfulness set up the test-set report, which --images-only does not write."),
    ],
)
def test_bad_arguments_give_one_clear_error(smoke_run, tmp_path, capsys, extra, message):
    code, _, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", *extra], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "layer9"], "argument --layer: invalid choice: 'layer9'"),
        (["--method", "gradcam2"], "argument --method: invalid choice: 'gradcam2'"),
        (["--num", "0"], "argument --num: 0 is not in 1..100"),
        (["--num", "101"], "argument --num: 101 is not in 1..100"),
        (["--num", "2.5"], "argument --num: invalid parse value: '2.5'"),
        (["--faithfulness", "-1"], "argument --faithfulness: -1 is not in 0.."),
        (["--images", *[f"/nonexistent{i}.png" for i in range(101)]], "--images takes at most 100 files"),
        (["--images-only", "--images", "/x.png", "--layer", "layer9"], "argument --layer: invalid choice: 'layer9'"),
    ],
)
def test_arguments_out_of_their_range_are_refused_by_the_parser(smoke_run, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        explain_cli.main(["--workdir", str(smoke_run), "--out", str(tmp_path / "r"), *map(str, extra)])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["--workdir", "--out", "--data-dir"])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(smoke_run, tmp_path, capsys, monkeypatch, flag):
    # `--out "$DIR"` with DIR unset had written the whole report into the working directory.
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", flag, ""], capsys)
    assert code == 1 and err == f"error: {flag} is an empty string (an unset shell variable?); give a path.\n"
    assert list(tmp_path.iterdir()) == []


def test_score_cam_on_a_cpu_says_why_the_report_takes_long(smoke_run, tmp_path, capsys):
    # Its passes run inside one jitted program, with no progress to show: a full-width report had
    # sat silent for minutes on a laptop.
    code, out, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", "--method", "scorecam", "--num", "2",
                          "--faithfulness", "2"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == ("Score-CAM runs a forward pass for each of the 16 channels of layer3 for every map, "
                                   "so on a CPU this report can take minutes (--faithfulness 0 skips its largest part).")
    assert "## scorecam at layer3 (8x8) for the predicted and the true class" in (tmp_path / "r" / "report.md").read_text()


def test_not_an_image_file(smoke_run, tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello")
    code, _, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", "--images", bogus], capsys)
    assert code == 1 and "not a readable PNG or JPEG" in err


def test_image_files_are_read_upright_and_as_8bit_rgb(tmp_path):
    # A vertical gradient, so a turn and a scale are both visible after the resize to 32x32.
    gradient = np.repeat(np.linspace(0, 1, 64)[:, None], 64, 1)
    plain = tmp_path / "plain.png"
    Image.fromarray(np.round(gradient * 255).astype(np.uint8)).save(plain)
    deep = tmp_path / "deep.png"  # 16-bit greyscale, which PIL's convert("RGB") clips to white
    Image.fromarray(np.round(gradient * 65535).astype(np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I;16")
    # A phone photo: the sensor's pixels turned a quarter, with EXIF orientation 6 to turn them back.
    sideways = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.round(np.rot90(gradient) * 255).astype(np.uint8)).convert("RGB").save(
        sideways, exif=exif, quality=100)
    expected, from_deep, from_phone = load_image_files([plain, deep, sideways])
    assert expected.dtype == np.uint8 and expected.shape == (32, 32, 3)
    assert expected[0].mean() < 10 and expected[-1].mean() > 245  # dark at the top, light at the bottom
    np.testing.assert_allclose(from_deep, expected, atol=1)
    np.testing.assert_allclose(from_phone, expected, atol=3)  # JPEG's rounding
    # One path given alone is one file; iterated, its characters were taken for paths ("'/' is a folder").
    np.testing.assert_array_equal(load_image_files(str(plain)), expected[None])
    np.testing.assert_array_equal(load_image_files(plain), expected[None])


def test_transparent_pixels_are_read_as_white(tmp_path):
    # An opaque red square on a transparent background whose stored colour is black, as editors
    # often leave it: viewers show white around the square, and so must the model's input.
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    palette = Image.fromarray(rgba[..., :3]).convert("P")  # black is one palette entry: make it transparent
    palette.save(tmp_path / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    Image.fromarray(rgba).convert("LA").save(tmp_path / "grey_alpha.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "opaque.png")
    rgba_image, palette_image, grey_image, opaque_image = load_image_files(
        [tmp_path / name for name in ("rgba.png", "palette.png", "grey_alpha.png", "opaque.png")])
    for image in (rgba_image, palette_image, grey_image):
        assert (image[:4] == 255).all() and (image[:, :4] == 255).all()  # the border is white
    np.testing.assert_array_equal(rgba_image[16, 16], (200, 0, 0))
    np.testing.assert_allclose(palette_image[16, 16], (200, 0, 0), atol=5)  # the palette's nearest red
    assert len(set(grey_image[16, 16])) == 1 and grey_image[16, 16, 0] < 100  # red's luminance, as grey
    assert (opaque_image[:4] == 0).all()  # without transparency, black stays black


def test_an_image_over_pils_size_limit_is_refused_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "panorama.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(DataError, match=rf"{re.escape(repr(str(path)))} has more pixels than PIL opens safely "
                                        r"\(2,000\); scale it down first, as it is resized to 32x32 anyway."):
        load_image_files([path])


def test_32bit_image_files_are_refused(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.random.default_rng(0).random((32, 32), np.float32)).save(path)
    with pytest.raises(DataError, match="has 32-bit float pixels of no fixed range"):
        load_image_files([path])


def test_a_perfect_model_shows_and_says_correct_images_instead(smoke_run, tmp_path, capsys):
    # The test split relabelled with the run's own predictions: the real model is then perfect on it.
    loaded = load_run(smoke_run)
    d = loaded.dataset
    predicted = loaded.logits(loaded.normalize(d.test_images)).argmax(-1)
    folder = write_official_batches(tmp_path / "cifar-10-batches-py", d.train_images, d.train_labels,
                                    d.test_images, predicted)
    code, _, err = run(["--workdir", smoke_run, "--out", tmp_path / "r", "--data-dir", folder, "--num", "3",
                        "--faithfulness", "0"], capsys)
    assert code == 0, err
    text = (tmp_path / "r" / "report.md").read_text()
    assert "100.00%" in text and "## No test image is misclassified; the first 3 instead" in text
    assert "misclassifications" not in text


def test_a_run_without_its_history_says_so_under_its_curves(smoke_run, tmp_path, capsys):
    copied = copy_run(smoke_run, tmp_path / "run")
    (copied / "history.json").unlink()
    code, _, err = run(["--workdir", copied, "--num", "3", "--faithfulness", "0"], capsys)
    assert code == 0, err
    text = (copied / "report" / "report.md").read_text()
    assert "## Loss and accuracy per epoch (the run has no history.json)" in text
    assert "Epochs trained" not in text  # the summary line that needs the history is left out
    with Image.open(copied / "report" / "curves.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10


def copy_run(run_dir, copied):
    """A copy of `run_dir` without the reports that explain.py wrote into it."""
    shutil.copytree(run_dir, copied, ignore=shutil.ignore_patterns("report", "images"))
    return copied


def copy_run_with_data_elsewhere(run_dir, copied):
    """A copy of `run_dir` whose config.json names data of another machine (Colab's /content)."""
    copy_run(run_dir, copied)
    config = json.loads((copied / "config.json").read_text())
    (copied / "config.json").write_text(json.dumps({**config, "data_dir": "/content/cifar-10-python.tar.gz"}))
    return copied


def test_a_run_whose_data_is_elsewhere_points_to_data_dir(smoke_run, official_folder, tmp_path, capsys):
    # A run copied from another machine (Colab's /content) names a path of that machine.
    copied = copy_run_with_data_elsewhere(smoke_run, tmp_path / "copied_run")
    code, _, err = run(["--workdir", copied, "--out", tmp_path / "r"], capsys)
    assert code == 1 and err == ("error: Data path '/content/cifar-10-python.tar.gz' does not exist (the data "
                                 "named in the run's config.json; give a copy on this machine with explain.py "
                                 "--data-dir).\n")
    assert not (tmp_path / "r").exists()
    code, _, err = run(["--workdir", copied, "--out", tmp_path / "r", "--data-dir", official_folder, "--num", "2",
                        "--faithfulness", "0"], capsys)
    assert code == 0, err
    # A wrong --data-dir is the user's own path: its message stands alone.
    code, _, err = run(["--workdir", copied, "--out", tmp_path / "r", "--data-dir", tmp_path / "nowhere"], capsys)
    assert code == 1 and err == f"error: Data path {str(tmp_path / 'nowhere')!r} does not exist.\n"


@pytest.mark.parametrize("given", ["data dir", "its version folder"])
def test_a_tensorflow_datasets_folder_given_as_data_dir_is_read_as_one(smoke_run, tmp_path, capsys, given):
    pytest.importorskip("tensorflow_datasets")
    version_dir = write_tfrecord_cifar10_metadata(tmp_path / "tensorflow_datasets")
    data_dir = tmp_path / "tensorflow_datasets" if given == "data dir" else version_dir
    copied = copy_run(smoke_run, tmp_path / "copied_run")
    code, _, err = run(["--workdir", copied, "--out", tmp_path / "r", "--data-dir", data_dir], capsys)
    assert code == 1 and err.startswith(f"error: {tfrecord_copy_error(version_dir)}") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_own_images_are_explained_without_the_data(smoke_run, official_folder, tmp_path, capsys):
    # Training records the classes and the normalization in each checkpoint...
    _, meta = load_variables(smoke_run)
    cifar = load_cifar10(official_folder)
    assert meta["class_names"] == list(cifar.class_names)
    np.testing.assert_array_equal(np.float32(meta["mean"]), cifar.mean)
    np.testing.assert_array_equal(np.float32(meta["std"]), cifar.std)
    # ... so a run copied to a machine without CIFAR-10 classifies and explains new images.
    copied = copy_run_with_data_elsewhere(smoke_run, tmp_path / "copied")
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, path in zip(images, files):
        Image.fromarray(image).save(path)
    code, _, err = run(["--workdir", copied, "--images", *files], capsys)
    assert code == 1 and err.endswith("give a copy on this machine with explain.py --data-dir); to classify and "
                                      "explain only your images, which needs no data, add --images-only.\n")
    code, out, err = run(["--workdir", copied, "--images", *files, "--images-only", "--layer", "layer2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (copied / "images").iterdir()) == ["custom_images.png"]
    assert not (copied / "report").exists()
    with Image.open(copied / "images" / "custom_images.png") as png:
        assert png.mode in ("RGB", "RGBA") and png.size[1] > 300
    # The same classes, probabilities and maps as with the data at hand.
    alone, with_data = load_run(copied, with_data=False), load_run(smoke_run)
    assert alone.dataset is None and alone.class_names == with_data.class_names
    for got, expected in zip(explain_images(alone, images, layer="layer2"), explain_images(with_data, images,
                                                                                           layer="layer2")):
        np.testing.assert_array_equal(got, expected)
    probs = explain_images(alone, images)[0]
    for path, image_probs in zip(files, probs):
        top = np.argsort(-image_probs, kind="stable")[0]
        assert f"{path}: {alone.class_names[top]} {100 * image_probs[top]:.1f}%" in out


def test_own_images_of_a_run_without_a_recorded_normalization_need_the_data(smoke_run, official_folder, tmp_path,
                                                                            capsys):
    copied = copy_run_with_data_elsewhere(smoke_run, tmp_path / "copied")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    (meta_file,) = (copied / "checkpoints" / "best").glob("*/meta/metadata")
    meta = json.loads(meta_file.read_text())
    # A checkpoint written before the normalization was recorded: the data is read, as for a report.
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("mean", "std")}))
    code, _, err = run(["--workdir", copied, "--images", image, "--images-only"], capsys)
    assert code == 1 and "'/content/cifar-10-python.tar.gz' does not exist" in err
    assert not (copied / "images").exists()
    code, _, err = run(["--workdir", copied, "--images", image, "--images-only", "--data-dir", official_folder], capsys)
    assert code == 0, err
    # The recorded normalization is the model's, even with data of other statistics at hand.
    meta_file.write_text(json.dumps({**meta, "mean": [0.25, 0.5, 0.75]}))
    np.testing.assert_array_equal(load_run(copied, data_dir=str(official_folder)).mean, np.float32([0.25, 0.5, 0.75]))
    # A record that was edited or damaged is named as such.
    meta_file.write_text(json.dumps({**meta, "std": [0.2, 0.0, 0.2]}))
    (copied / "images" / "custom_images.png").unlink()
    code, _, err = run(["--workdir", copied, "--images", image, "--images-only"], capsys)
    assert code == 1 and err == (f"error: The classes and normalization recorded in the best checkpoint in "
                                 f"{str(copied)!r} are malformed (expected class names, 3 channel means and 3 positive "
                                 "standard deviations); it was edited or damaged.\n")
    assert not (copied / "images" / "custom_images.png").exists()
    # Two classes of one name would have merged in the report's rows.
    names = meta["class_names"]
    meta_file.write_text(json.dumps({**meta, "class_names": [names[0], *names[:-1]]}))
    code, _, err = run(["--workdir", copied, "--images", image, "--images-only"], capsys)
    assert code == 1 and "are malformed (expected class names, 3 channel means" in err
    assert not (copied / "images" / "custom_images.png").exists()


def test_the_workdir_instead_of_a_run_names_the_newest_run(smoke_run, tmp_path, capsys):
    # train.py's --workdir is the folder that holds the runs, so users pass it here too.
    code, _, err = run(["--workdir", smoke_run.parent, "--out", tmp_path / "r"], capsys)
    assert code == 1 and err == (f"error: {str(smoke_run.parent)!r} is not a jaxcam run directory (no config.json); it "
                                 f"holds run directories, so pass one, such as the newest {str(smoke_run)!r}.\n")
    assert not (tmp_path / "r").exists()


def test_a_folder_inside_a_run_names_the_run(smoke_run, tmp_path, capsys):
    # Tab completion easily goes one step too far, into the checkpoint folders or the report.
    for inside in (smoke_run / "checkpoints", smoke_run / "checkpoints" / "best"):
        code, _, err = run(["--workdir", inside, "--out", tmp_path / "r"], capsys)
        assert code == 1 and err == (f"error: {str(inside)!r} is not a jaxcam run directory (no config.json); it lies "
                                     f"inside the run directory {str(smoke_run)!r}, so pass that.\n")
    assert not (tmp_path / "r").exists()


def test_unwritable_output_folder(smoke_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["--workdir", smoke_run, "--out", blocker / "report"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"Cannot write to the output folder {str(blocker / 'report')!r}" in err
    assert blocker.read_text() == "not a folder"
    # The output folder itself a file: said so, not mkdir's bare "File exists".
    code, _, err = run(["--workdir", smoke_run, "--out", blocker], capsys)
    assert code == 1 and err == f"error: Cannot write to the output folder {str(blocker)!r} ({str(blocker)!r} is a file, not a folder).\n"
    assert blocker.read_text() == "not a folder"


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def fault_late_in_the_report(monkeypatch, fault) -> None:
    """Run `fault` where the report draws its samples gallery, after several files are drawn."""
    from jaxcam import viz

    monkeypatch.setattr(viz, "plot_samples_per_class", fault)


def folder_with_a_users_file(folder):
    """`folder`, made, holding the user's own `notes.txt`, which explain.py must leave alone."""
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def test_a_failure_part_way_leaves_the_previous_report_whole(smoke_run, report, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    shutil.copytree(report, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fault_late_in_the_report(monkeypatch, disk_full)
    code, _, err = run(["--workdir", smoke_run, "--out", out, "--num", "3", "--faithfulness", "0"], capsys)
    assert code == 1 and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no staging folder left


def test_a_stop_that_matplotlib_turns_into_an_error_still_reads_as_a_stop(smoke_run, tmp_path, monkeypatch, capsys):
    # matplotlib's C code catches the KeyboardInterrupt that a SIGTERM raises inside it and raises an
    # error of its own: explain.py stopped while it drew had said "error: Invalid affine
    # transformation matrix". Here the SIGTERM comes while matplotlib reads a transform.
    from matplotlib import _path

    class SigtermWhileRead:
        def __array__(self, dtype=None, copy=None):
            signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
            return np.eye(3)

    def drawing_when_the_stop_comes(*args, **kwargs):
        _path.affine_transform(np.zeros((1, 2)), SigtermWhileRead())

    fault_late_in_the_report(monkeypatch, drawing_when_the_stop_comes)
    out = folder_with_a_users_file(tmp_path / "r")
    code, _, err = run(["--workdir", smoke_run, "--out", out, "--num", "3", "--faithfulness", "0"], capsys)
    assert code == 1 and err == "error: interrupted.\n"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_first_report_leaves_no_empty_output_folder(smoke_run, tmp_path, monkeypatch, capsys):
    fault_late_in_the_report(monkeypatch, disk_full)
    folder_with_a_users_file(tmp_path / "kept")
    for out in (tmp_path / "new" / "deeper" / "r", tmp_path / "kept" / "r"):
        code, _, err = run(["--workdir", smoke_run, "--out", out, "--num", "3", "--faithfulness", "0"], capsys)
        assert code == 1 and "No space left on device" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["kept", "kept/notes.txt"]


def test_not_a_run_directory(tmp_path, capsys):
    code, _, err = run(["--workdir", tmp_path], capsys)
    assert code == 1 and err == f"error: {str(tmp_path)!r} is not a jaxcam run directory (no config.json).\n"
    code, _, err = run(["--workdir", tmp_path / "typo"], capsys)
    assert code == 1 and err == f"error: The run directory {str(tmp_path / 'typo')!r} does not exist.\n"
    assert not (tmp_path / "typo").exists()


def test_a_run_stopped_in_its_first_epoch_is_said_to_have_no_checkpoint_yet(smoke_run, tmp_path, capsys):
    # What Ctrl-C during epoch 1 leaves: config.json and empty checkpoint folders, no history.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(smoke_run / "config.json", stopped)
    Checkpointer(stopped).close()
    code, _, err = run(["--workdir", stopped], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert (f"No complete best checkpoint in {str(stopped / 'checkpoints' / 'best')!r}: no epoch of this run has "
            "ended yet; train.py --resume continues it.") in err
    assert not (stopped / "report").exists()


def test_corrupt_best_checkpoint_keeps_the_existing_report(smoke_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    (step,) = (copy / "checkpoints" / "best").iterdir()
    for f in (step / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    code, _, err = run(["--workdir", copy, "--out", out], capsys)
    assert code == 1 and "corrupt" in err and len(err.strip().splitlines()) == 1
    assert (out / "report.md").read_text() == "an earlier report"


def test_a_checkpoint_that_does_not_fit_its_config_is_named(smoke_run, tmp_path, capsys):
    # Had been "does not fit its config's model (ScopeParamShapeError)", naming nothing that differs.
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "width": 8}))
    code, _, err = run(["--workdir", copy, "--out", tmp_path / "r"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert (f"The weights of the best checkpoint in {str(copy)!r} do not fit ResNet18 at width 8 with 10 classes: "
            "'params/bn1/bias' has shape (4,), the model's has (8,)") in err
    assert not (tmp_path / "r").exists()


def test_a_run_trained_on_other_classes_is_not_explained_with_its_configs_data(official_folder, tmp_path):
    # A dataset passed in code (train_and_evaluate(dataset=...)) is not what the run's config names;
    # with as many classes, the report would have explained the run with the wrong images and names.
    cifar = load_cifar10(official_folder)
    renamed = dataclasses.replace(cifar, class_names=tuple(f"kind{i}" for i in range(10)))
    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.update(dict(width=4, epochs=1, batch_size=32, eval_batch_size=16, data_dir=str(official_folder),
                       tensorboard=False, print_summary=False))
    train_and_evaluate(config, tmp_path, dataset=renamed, progress=False, log=lambda line: None)
    message = (rf"{re.escape(repr(str(tmp_path)))} was trained on the classes kind0, kind1, .*kind9, but its data "
               rf"\({re.escape(repr(str(official_folder)))}\) has airplane, automobile, .*truck; give the data it "
               r"was trained on \(explain.py --data-dir, or dataset= in code\).")
    with pytest.raises(DataError, match=message):
        load_run(tmp_path)
    # The dataset it was trained on, given in code as to train_and_evaluate, explains it.
    out = explain_run(tmp_path, tmp_path / "report", dataset=renamed, num=2, faithfulness_images=0, log=lambda s: None)
    assert "kind0" in (out / "report.md").read_text() and "airplane" not in (out / "report.md").read_text()
    with pytest.raises(DataError, match=r"but its data \(the dataset given\) has airplane"):
        load_run(tmp_path, dataset=cifar)
    with pytest.raises(ValueError, match="Give the data either as a dataset or as data_dir, not both."):
        load_run(tmp_path, data_dir=str(official_folder), dataset=renamed)


def test_bfloat16_run_keeps_float32_parameters_and_the_report_says_why_accuracy_differs(official_folder, tmp_path,
                                                                                         capsys):
    import train as train_cli

    code = train_cli.main(["--workdir", str(tmp_path / "runs"), "--config", str(ROOT / "configs" / "smoke.py"),
                           "--config.width=4", "--config.epochs=1", "--config.batch_size=32",
                           "--config.eval_batch_size=16", "--config.dtype='bfloat16'", "--config.tensorboard=False",
                           f"--config.data_dir={str(official_folder)!r}"])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    variables, meta = load_variables(run_dir)
    assert meta["compute_dtype"] == "bfloat16"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))
    code, _, err = run(["--workdir", run_dir, "--out", tmp_path / "r", "--num", "2", "--layer", "layer3",
                        "--faithfulness", "0"], capsys)
    assert code == 0, err
    line = next(l for l in (tmp_path / "r" / "report.md").read_text().splitlines() if "Test accuracy" in l)
    assert line.endswith(f"computed in float32 as the explanations are; training measured "
                         f"{100 * meta['test_acc']:.2f}% for this checkpoint in bfloat16")


def test_a_float32_run_needs_no_precision_note(smoke_run, report):
    _, meta = load_variables(smoke_run)
    assert meta["compute_dtype"] == "float32"
    assert "training measured" not in (report / "report.md").read_text()


def test_the_readmes_library_example_runs(smoke_run, official_folder):
    # The README's example, on the tests' data and run (a width-4 model): its names and signatures must hold.
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## As a library"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    for placeholder, actual in (("/path/to/cifar-10-batches-py", str(official_folder)),
                                ("runs/resnet18_20261121_120000", str(smoke_run)),
                                ("models.ResNet18()", "models.ResNet18(width=4)")):
        assert placeholder in code, placeholder
        code = code.replace(placeholder, actual)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    maps = namespace["maps"]
    assert maps.shape == (8, 32, 32) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1


def test_sigterm_stops_explain_py_and_leaves_the_output_folder_as_it_was(smoke_run, tmp_path):
    # SIGTERM had ended explain.py at once, leaving its half-made hidden staging folder behind.
    out = folder_with_a_users_file(tmp_path / "out")
    status, err = sigterm_once(cli_command("explain.py", "--workdir", smoke_run, "--out", out),
                               once_present(out, ".report-*"))
    assert status == 1 and err.splitlines()[-1] == "error: interrupted.", err[-2000:]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

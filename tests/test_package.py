"""`import jaxcam` alone reaches every part of the library (SPEC item 9), loading each on first use."""

import subprocess
import sys

import pytest

from conftest import ROOT


def test_bare_import_reaches_the_public_api_lazily():
    # A fresh interpreter: in this one the tests have imported the submodules already.
    code = (
        "import sys, jaxcam\n"
        "print(sorted(m for m in sys.modules if m.startswith('jaxcam.')))\n"
        "print(callable(jaxcam.models.ResNet18), callable(jaxcam.data.augment_batch), callable(jaxcam.cam.compute),"
        " callable(jaxcam.train.onecycle), callable(jaxcam.models.from_torch_state_dict))\n"
        "print('jaxcam.cam' in sys.modules, 'jaxcam.explain' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, reached, loaded = result.stdout.splitlines()
    assert before == "[]"  # nothing heavy at import time
    assert reached == "True True True True True"
    assert loaded == "True False"  # only what was used


def test_unknown_attribute_is_an_attribute_error():
    import jaxcam

    with pytest.raises(AttributeError, match="no attribute 'resnet'"):
        jaxcam.resnet
    assert {"models", "data", "train", "cam"} <= set(dir(jaxcam))


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    # jaxcam.viz had called matplotlib.use("Agg") on import: in a notebook that switched the inline
    # backend off, so plt.show() of the user's own figures (the Colab notebook's last cell) drew nothing.
    # A fresh interpreter, whose backend is chosen before jaxcam is imported, as a notebook's is.
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "from jaxcam import explain, lr_finder, viz\n"
        "out = sys.argv[1]\n"
        "viz.plot_curves([], out + '/curves.png')\n"
        "result = lr_finder.RangeTestResult(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.5, 3.0], diverged=False)\n"
        "lr_finder.plot(result, out + '/lr.png', skip_start=0, skip_end=0)\n"
        "print(matplotlib.get_backend(), plt.get_fignums())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "svg []"  # the backend kept, and no figure left open in pyplot
    assert (tmp_path / "curves.png").read_bytes()[:8] == (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

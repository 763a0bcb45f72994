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

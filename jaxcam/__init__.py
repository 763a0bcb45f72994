"""jaxcam: train a CIFAR ResNet18 in pure JAX and explain it with Grad-CAM.

`import jaxcam` is cheap; each submodule loads on first use, so `jaxcam.cam.compute(...)` works
after a bare `import jaxcam` without paying for TensorFlow Datasets or the model code up front.

    models      ResNet18/ResNet34 (CIFAR layout), PyTorch state-dict conversion, summary
    data        CIFAR-10 (tfds or an official local copy), numpy augmentation, input pipeline
    schedules   one-cycle LR and momentum schedules equal to torch's OneCycleLR
    train       train state, data-parallel step, training loop (`train_and_evaluate`)
    checkpoint  orbax checkpoints of a run directory (latest and best)
    lr_finder   LR range test
    cam         Grad-CAM and the other CAM methods on one shared core
    metrics     faithfulness metrics (deletion/insertion AUC, average drop/increase)
    viz         overlays, galleries and plots
    explain     the report of a run directory (explain.py)
    configuration  Python config files and --config.KEY=VALUE overrides
    cli         the front ends of train.py and explain.py (one-sentence errors, exit 1)
"""

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = ("models", "data", "schedules", "train", "checkpoint", "configuration", "cli", "lr_finder", "cam",
               "metrics", "viz", "explain")
__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> ModuleType:
    # PEP 562: load a submodule the first time it is used as an attribute of the package.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))

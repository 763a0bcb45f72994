"""Shared helpers for the benchmarks: timing, device/version description, optional imports."""

from __future__ import annotations

import importlib
import platform
import statistics
import sys
import time
import types
from typing import Callable


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[object], object] = lambda x: x) -> float:
    """Median seconds of `repeats` calls of fn (each followed by `sync` of its result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe() -> dict:
    import jax
    import numpy as np

    info = {
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def import_pytorch_grad_cam():
    """Import pytorch_grad_cam, or None if it (or its own needs) is missing.

    pytorch-grad-cam 1.5.7 imports torchvision at module level for box IoU and image
    transforms that CAM computation never calls. Where no torchvision build exists (the CPU
    machines here), an empty stand-in module satisfies those imports; the CAM code is real.
    """
    try:
        importlib.import_module("torchvision")
    except ImportError:
        modules = {name: types.ModuleType(name) for name in
                   ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops")}
        for name in ("Compose", "Normalize", "ToTensor"):
            setattr(modules["torchvision.transforms"], name, object)
        modules["torchvision.transforms.functional"].resize = None
        modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
        modules["torchvision"].transforms = modules["torchvision.transforms"]
        modules["torchvision"].ops = modules["torchvision.ops"]
        sys.modules.update(modules)
    try:
        return importlib.import_module("pytorch_grad_cam")
    except ImportError:
        return None


def torch_device_and_sync():
    """("cuda" or "cpu", a sync function for timing) for PyTorch."""
    import torch

    if torch.cuda.is_available():
        return "cuda", lambda result: torch.cuda.synchronize()
    return "cpu", lambda result: result

"""Python configs for train.py (`--config configs/<name>.py`), each with get_config()."""

import os


def shared_subset() -> str | None:
    """../shared/data/cifar10-subset beside this checkout (real CIFAR-10 images), or None if absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    subset = os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "cifar10-subset"))
    return subset if os.path.isdir(subset) else None


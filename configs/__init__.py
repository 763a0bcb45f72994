"""Python configs for train.py (`--config configs/<name>.py`), each with get_config()."""

import os

import ml_collections

from configs import default


def shared_subset() -> str | None:
    """../shared/data/cifar10-subset beside this checkout (real CIFAR-10 images), or None if absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    subset = os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "cifar10-subset"))
    return subset if os.path.isdir(subset) else None


def default_on_shared_subset(name: str, **changes) -> ml_collections.ConfigDict:
    """The default recipe named `name`, reading the shared subset, with the top-level `changes`."""
    config = default.get_config()
    config.name = name
    config.data_dir = shared_subset()
    config.update(changes)
    return config

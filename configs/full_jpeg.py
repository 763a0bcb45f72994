"""The default recipe on the whole CIFAR-10 (JPEG copy), at a width and length that fit a 2-core CPU.

    python train.py --config configs/full_jpeg.py --workdir runs    # about 9 min on 2 CPU cores

Reads ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz (50,000 training and 10,000 test images as JPEG
files in class folders); width 8, 4 epochs, batch 128 (on 2 CPU cores a step at batch 128 runs 1.7x more images a
second than at 512). Everything else is the default recipe.
"""

import os

from configs import default


def get_config():
    config = default.get_config()
    config.name = "full_jpeg"
    here = os.path.dirname(os.path.abspath(__file__))
    config.data_dir = os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "cifar10-jpeg", "cifar10-jpeg.tar.gz"))
    config.update(dict(width=8, epochs=4, batch_size=128))
    return config

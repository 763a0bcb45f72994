"""The learning check on real images: the default recipe at width 16, 15 epochs, batch 128, on the
local CIFAR-10 subset (../shared/data/cifar10-subset: 5,085 training and 1,017 test images).

    python train.py --config configs/learning_check.py --workdir runs    # 5.5-6.5 min on 2 CPU cores

Everything else (optimizer, one-cycle, label smoothing, crop + flip + cutout) is the default recipe.
"""

from configs import default, shared_subset


def get_config():
    config = default.get_config()
    config.name = "learning_check"
    config.data_dir = shared_subset()
    config.width = 16
    config.epochs = 15
    config.batch_size = 128
    return config

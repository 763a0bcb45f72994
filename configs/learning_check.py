"""The learning check on real images: the default recipe at width 16, 15 epochs, batch 128, on the
local CIFAR-10 subset (../shared/data/cifar10-subset: 5,085 training and 1,017 test images).

    python train.py --config configs/learning_check.py --workdir runs    # 6-15 min on 2 CPU cores

Everything else (optimizer, one-cycle, label smoothing, crop + flip + cutout) is the default recipe.
"""

from configs import default_on_shared_subset


def get_config():
    return default_on_shared_subset("learning_check", width=16, epochs=15, batch_size=128)

"""The default recipe: ResNet18, 20 epochs, batch 512, SGD + Nesterov, one-cycle, crop + flip + cutout."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "resnet18"
    # Data: None reads tensorflow-datasets' cifar10; else a local official copy
    # (cifar-10-python.tar.gz, cifar-10-batches-py/, or a folder holding either).
    config.data_dir = None
    # tensorflow-datasets' data dir (None: its default, ~/tensorflow_datasets), or its cifar10/ folder.
    config.tfds_data_dir = None
    # Model.
    config.model = "resnet18"
    config.width = 64
    # Compute dtype; parameters stay float32. "auto": bfloat16 on TPUs and on GPUs with bfloat16
    # units (Ampere and later), float32 on older GPUs (Colab's T4, the V100) and CPUs.
    config.dtype = "auto"
    # Optimization.
    config.epochs = 20
    config.batch_size = 512
    config.eval_batch_size = 1000
    config.optimizer = "sgd"  # sgd | adam | adamw
    config.momentum = 0.9  # used when cycle_momentum is False
    config.nesterov = True
    config.beta2 = 0.999
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.schedule = "onecycle"  # onecycle | constant
    config.max_lr = 0.4  # or "auto": take the LR range test's suggestion (train.py --find-lr)
    config.pct_start = 0.25
    config.div_factor = 25.0
    config.final_div_factor = 1e4
    config.anneal_strategy = "cos"
    config.three_phase = False
    config.cycle_momentum = True
    config.base_momentum = 0.85
    config.max_momentum = 0.95
    # Augmentation (numpy, on a background thread).
    config.augment = True
    config.crop_padding = 4
    config.cutout_size = 16
    config.cutout_prob = 0.5
    config.flip = True
    config.prefetch = 3
    # LR range test (train.py --find-lr).
    config.lr_finder = ml_collections.ConfigDict()
    config.lr_finder.start_lr = 1e-5
    config.lr_finder.end_lr = 10.0
    config.lr_finder.num_iter = 100
    config.lr_finder.step_mode = "exp"
    config.lr_finder.smooth_f = 0.05
    config.lr_finder.diverge_th = 5.0
    config.lr_finder.skip_start = 10
    config.lr_finder.skip_end = 5
    config.lr_finder.up_to_minimum = True  # False: pytorch-lr-finder's rule over the whole curve
    # Bookkeeping.
    config.seed = 0
    config.tensorboard = True
    config.print_summary = True
    return config

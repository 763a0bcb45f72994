"""A tiny run that finishes in seconds on a CPU: width-8 ResNet18, 2 epochs on the local subset."""

from configs import default, shared_subset


def get_config():
    config = default.get_config()
    config.name = "smoke"
    config.data_dir = shared_subset()
    config.width = 8
    config.epochs = 2
    config.batch_size = 256
    config.eval_batch_size = 512
    config.max_lr = 0.2
    config.print_summary = False
    config.lr_finder.num_iter = 20
    config.lr_finder.skip_start = 2
    config.lr_finder.skip_end = 2
    return config

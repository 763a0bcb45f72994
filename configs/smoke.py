"""A tiny run that finishes in seconds on a CPU: width-4 ResNet18, 2 epochs on the local subset."""

from configs import default_on_shared_subset


def get_config():
    config = default_on_shared_subset("smoke", width=4, epochs=2, batch_size=256, eval_batch_size=512,
                                      max_lr=0.2, print_summary=False)
    config.lr_finder.update(num_iter=20, skip_start=2, skip_end=2)
    return config

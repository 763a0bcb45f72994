"""Train a CIFAR ResNet with jaxcam.

    python train.py --workdir runs [--config configs/default.py] [--config.KEY=VALUE ...]
    python train.py --workdir runs --resume [--config.data_dir=PATH]   # the newest run in runs/
    python train.py --resume RUN_DIR [--config.data_dir=PATH]
    python train.py --workdir runs --find-lr [--config.max_lr=auto]

Many hosts (the same command in every process; README "Many hosts"):
    python train.py --workdir runs --distributed                     # TPU pod slice, SLURM, Open MPI
    python train.py --workdir runs --coordinator_address HOST:PORT --num_processes N --process_id I
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxcam import cli


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and train; returns the exit status (0, or 1 after a one-sentence error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Not required with --resume RUN_DIR, which names the run itself.
    parser.add_argument("--workdir", default=None, help="folder that receives the run directory (not needed with "
                                                        "--resume RUN_DIR)")
    parser.add_argument("--config", default=None, help="Python config file with get_config() (default: configs/default.py)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                        help="continue a run from its latest checkpoint (default: the newest run in --workdir); only "
                             "--config.data_dir and --config.tfds_data_dir may be given with it")
    parser.add_argument("--find-lr", action="store_true",
                        help="run the LR range test first; with --config.max_lr=auto train with its suggestion")
    parser.add_argument("--find-lr-only", action="store_true", help="run the LR range test and stop")
    hosts = parser.add_argument_group("many hosts", "one process per host, all writing into one run directory on a "
                                                    "shared filesystem")
    hosts.add_argument("--distributed", action="store_true",
                       help="join the processes that jax.distributed detects (TPU pod slice, SLURM, Open MPI)")
    hosts.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address, the same for all")
    hosts.add_argument("--num_processes", type=int, metavar="N", help="how many processes the run has")
    hosts.add_argument("--process_id", type=int, metavar="I", help="this process's number, 0 to N-1")
    args, overrides = parser.parse_known_args(argv)
    if args.workdir is None:
        if args.resume is None:
            parser.error("the following arguments are required: --workdir")
        if args.resume == "latest":
            parser.error("--resume without a RUN_DIR continues the newest run in --workdir, so give --workdir "
                         "or the run directory")
    if args.config is None and not args.resume:
        # Beside this script, so that train.py also runs from another working directory.
        args.config = str(Path(__file__).resolve().parent / "configs" / "default.py")
    return cli.run_train(args, overrides)


if __name__ == "__main__":
    cli.exit_process(main())

"""Explain a trained jaxcam run: curves, galleries, Grad-CAM overlays and a report.

    python explain.py --workdir RUN_DIR [--out DIR] [--layer layer3 layer2] [--method gradcam]
                      [--num 10] [--images a.png b.jpg]
    python explain.py --workdir RUN_DIR --images a.png b.jpg --images-only   # no CIFAR-10 needed
"""

from __future__ import annotations

import argparse

from jaxcam import cli
from jaxcam.cam import METHODS
from jaxcam.explain import MAX_GALLERY_ROWS
from jaxcam.models import STAGES


def _count(low: int, high: int | None = None):
    """An argparse type: an integer in low..high (no upper bound where high is None)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high if high is not None else ''}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the report; returns the exit status (0, or 1 after a one-sentence error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report, or RUN_DIR/images with --images-only)")
    parser.add_argument("--layer", nargs="+", default=["layer3", "layer2"], choices=STAGES,
                        help="stages to explain (first is the main one)")
    parser.add_argument("--method", default="gradcam", choices=METHODS)
    # --num and --faithfulness default to None, so that --images-only can tell they were given.
    parser.add_argument("--num", type=_count(1, MAX_GALLERY_ROWS), default=None,
                        help=f"how many misclassified images to show (1 to {MAX_GALLERY_ROWS}; default 10)")
    parser.add_argument("--images", nargs="+", default=[], help="your own PNG/JPEG files to classify and explain")
    parser.add_argument("--images-only", action="store_true",
                        help="explain only the --images files (into RUN_DIR/images by default), without CIFAR-10")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 location if not the one the run was trained on: an official copy, or a "
                             "tensorflow-datasets folder")
    parser.add_argument("--faithfulness", type=_count(0), default=None,
                        help="test images for the faithfulness metrics (0: skip; default 64)")
    args = parser.parse_args(argv)
    if len(args.images) > MAX_GALLERY_ROWS:
        parser.error(f"--images takes at most {MAX_GALLERY_ROWS} files (one gallery row each)")
    return cli.run_explain(args)


if __name__ == "__main__":
    cli.exit_process(main())

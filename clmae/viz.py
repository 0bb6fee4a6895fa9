"""`clmae-viz`: pictures of the curriculum masking module's masks."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-viz", description="Draw the masks of a trained CL-MAE.")
    sub = parser.add_subparsers(dest="what", required=True)
    masks = sub.add_parser("masks", help="image, masked image and reconstruction for a few images")
    masks.add_argument("checkpoint", nargs="?", help="a checkpoint directory")
    masks.add_argument("--images", nargs="+", help="image files")
    masks.add_argument("--out", help="output PNG")
    masks.add_argument("--over-training", metavar="RUN_DIR", help="the same images across saved checkpoints")
    return parser


def main() -> None:
    build_parser().parse_args()
    print("clmae-viz: not available yet (issue 7)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

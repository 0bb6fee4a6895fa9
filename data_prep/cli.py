"""`clmae-prep` / `python -m data_prep`: dataset conversion to FFCV."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-prep", description="Convert image datasets to FFCV .beton files.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("imagefolder", help="class-per-subfolder tree -> one .beton")
    sub.add_parser("imagenet", help="ImageNet-1k train/ and val/ -> train.beton, val.beton, class index")
    sub.add_parser("digits", help="the embedded scikit-learn digits set -> train/val .beton")
    sub.add_parser("verify", help="check a .beton file")
    return parser


def main() -> None:
    build_parser().parse_args()
    print("clmae-prep: not available yet (issue 4)", file=sys.stderr)
    sys.exit(2)

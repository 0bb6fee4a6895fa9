"""`clmae-export`: consolidate a ZeRO checkpoint and write a timm-compatible encoder."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clmae-export", description="Export the encoder of a checkpoint as a timm state dict."
    )
    parser.add_argument("checkpoint_dir", help="a checkpoint directory written by clmae-pretrain")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .pth)")
    return parser


def main() -> None:
    build_parser().parse_args()
    print("clmae-export: not available yet (issue 7)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

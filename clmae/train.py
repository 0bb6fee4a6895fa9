"""`clmae-pretrain`: CL-MAE pre-training (launched by torchrun, the deepspeed launcher or srun)."""

from __future__ import annotations

import argparse
import sys

import yaml

from clmae.cli import add_config_arguments, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clmae-pretrain",
        description="Pre-train a CL-MAE (MAE + curriculum masking module) with DeepSpeed.",
        epilog="example: torchrun --nproc_per_node 2 -m clmae.train --config tiny_digits optim.base_lr=1e-3",
    )
    add_config_arguments(parser)
    return parser


def _main() -> int:
    args = build_parser().parse_args()
    from clmae.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    print("clmae-pretrain: the training loop is not available yet (issue 5); --print-config works", file=sys.stderr)
    return 2


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()

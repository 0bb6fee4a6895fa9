"""`clmae-eval`: linear probe, few-shot, k-NN and fine-tuning of a pre-trained encoder."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-eval", description="Evaluate a pre-trained CL-MAE encoder.")
    sub = parser.add_subparsers(dest="protocol", required=True)
    for name, text in [
        ("linprobe", "MAE linear-probe recipe (frozen encoder, BN + Linear, LARS)"),
        ("fewshot", "linear probe on 1, 2, 4, 8, 16 labelled images per class, 3 seeds"),
        ("knn", "k-NN: reference (L2, k=5, majority) and weighted cosine (k=20, T=0.07)"),
        ("finetune", "MAE fine-tuning recipe on DeepSpeed"),
    ]:
        sub.add_parser(name, help=text, description=text)
    return parser


def main() -> None:
    build_parser().parse_args()
    print("clmae-eval: not available yet (issue 7)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

"""Helpers shared by the console scripts (argument conventions, clean error exits)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def run_main(main: Callable[[], int | None]) -> None:
    """Turn the known user errors into one line on stderr and exit code 2, instead of a traceback."""
    from clmae.errors import ClmaeError

    try:
        code = main()
    except (ClmaeError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="shipped config name (e.g. tiny_digits, vitb) or path to a YAML file; defaults.yaml alone if omitted",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides applied last, e.g. optim.base_lr=1.5e-4 data.batch_size=64",
    )
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")

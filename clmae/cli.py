"""Helpers shared by the console scripts (argument conventions, clean error exits)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def run_main(main: Callable[[], int | None], skip_teardown: bool = False) -> None:
    """Turn the known user errors into one line on stderr and exit code 2, instead of a traceback.

    skip_teardown: for the scripts that start a process group. DeepSpeed's engines and groups keep the
    backend's C++ objects (gloo's worker threads and pending work) referenced after
    `destroy_process_group`; destroyed during the interpreter's teardown they can abort a process whose
    work ended well ("terminate called without an active exception", exit code -6: rank 0 of a 2-rank
    run that had saved its last checkpoint, once in a CI run of the test suite). By the time `main`
    returns, every file is written and closed, the MLflow run ended and the process group destroyed: the
    process then ends without that teardown.
    """
    from clmae.errors import ClmaeError

    try:
        code = main() or 0
    except (ClmaeError, FileNotFoundError, FileExistsError) as err:
        # The launcher's rank variables (torchrun: RANK, srun: SLURM_PROCID), as clmae.dist reads them.
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
        if not getattr(err, "every_rank", False) or rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    if skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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

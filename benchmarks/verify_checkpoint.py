"""How long the checkpoint manifest costs: hashing at save time and verification at resume / export.

    python benchmarks/verify_checkpoint.py --model vit_base_patch16 --ranks 8 --dir /scratch/tmp

Writes a checkpoint directory with the files, and sizes, of a ZeRO-2 bf16 save of the model's MAE and CMM
engines by `--ranks` ranks (module weights in 16 bit on rank 0, fp32 master weights + Adam's two moments
split across the ranks, one RNG file per rank), then times with clmae's own functions:

- the manifest at save time, as one rank hashes everything (`_commit`; in a run each rank hashes only its own
  shards, in parallel);
- `verify_checkpoint(full)` with the files in the page cache (right after a save) and not (a resume on
  another node: each file is dropped from the cache with posix_fadvise first);
- `verify_checkpoint(size)`.

Each figure is the fastest of `--repeat` runs. Prints one JSON line per measurement; `--json FILE` writes
them all. The content is random bytes: hashing speed does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

from clmae.checkpoint import COMPLETE_MARKER, ENGINE_TAG, _commit, checkpoint_root, step_dir_name, verify_checkpoint
from clmae.config import MODEL_NAMES, load_config


def engine_params(model: str) -> dict[str, int]:
    """Trainable parameters of the MAE and the CMM engines of `model` (built on the meta device: no memory)."""
    import torch

    from clmae.masking import build_models

    with torch.device("meta"):
        mae, cmm = build_models(load_config(None, [f"model.name={model}"]))
    count = {"mae": mae, "cmm": cmm}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in count.items()}


def write_checkpoint(root: Path, params: dict[str, int], ranks: int) -> Path:
    path = checkpoint_root(root) / step_dir_name(1)
    block = os.urandom(1 << 24)

    def write(file: Path, size: int) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
            handle.write(block[: size % len(block)])

    for engine, count in params.items():
        state = path / engine / ENGINE_TAG
        write(state / "mp_rank_00_model_states.pt", 2 * count)  # bf16 module weights, rank 0
        for rank in range(ranks):  # fp32 master weights + exp_avg + exp_avg_sq, one slice per rank
            write(state / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", 12 * count // ranks)
    for rank in range(ranks):
        write(path / "rng" / f"rank_{rank:05d}.pt", 6000)
    (path / "client_state.json").write_text("{}")
    return path


def drop_from_page_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(action, repeat: int = 1, before=None) -> float:
    """The fastest of `repeat` runs: on a shared machine, the one least slowed by other work."""
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16", choices=MODEL_NAMES)
    parser.add_argument("--ranks", type=int, default=8, help="ranks that wrote the checkpoint")
    parser.add_argument("--dir", default=None, help="where to write it (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=3, help="report the fastest of this many runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    params = engine_params(args.model)
    root = Path(tempfile.mkdtemp(prefix="clmae-verify-", dir=args.dir))
    rows = []
    try:
        path = write_checkpoint(root, params, args.ranks)
        gib = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
        base = {"model": args.model, "params": params, "ranks": args.ranks, "gib": round(gib, 3)}

        def report(what: str, seconds: float) -> None:
            row = {**base, "what": what, "seconds": round(seconds, 3), "gib_per_s": round(gib / seconds, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)

        n = args.repeat
        report("manifest at save, one process (page cache warm)", timed(lambda: _commit(path, [{}], 1), n))
        assert (path / COMPLETE_MARKER).is_file()
        report("verify full, page cache warm", timed(lambda: verify_checkpoint(path, "full"), n))
        cold = partial(drop_from_page_cache, path)
        report("verify full, page cache cold", timed(lambda: verify_checkpoint(path, "full"), n, before=cold))
        report("verify size", timed(lambda: verify_checkpoint(path, "size"), n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

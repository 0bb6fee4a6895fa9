"""What re-sharding a checkpoint costs: DeepSpeed's universal conversion (clmae.elastic), timed on a real one.

Two ranks (gloo, CPU) build the CL-MAE's two engines for --model, take one optimiser step (so that the Adam
moments exist) and write a clmae checkpoint; then this process converts it, as a resume on another number
of ranks does, and reports the conversion's wall time and each engine's size before and after. The estimate
for the other models scales the measured seconds per GiB by their fp32 training state (weights + master
copy + two Adam moments = 12 bytes per trained parameter on top of the 4 of the module), which is what the
conversion reads and writes; their parameters are counted on the meta device (no memory).

    python benchmarks/reshard_conversion.py                      # ViT-B/16, ZeRO-2
    python benchmarks/reshard_conversion.py --model vit_tiny --stage 3 --json out.json

ViT-B/16 at ZeRO-2 took 6.5 min on 2 shared, busy CPU cores: 142 s for the 2-rank save, 150 s to convert 2.2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clmae.cli import run_main
from clmae.config import MODEL_NAMES, load_config


def save_checkpoint(model: str, stage: int, run_dir: Path) -> None:
    """The worker (each of 2 ranks): engines, one iteration on random images, a checkpoint."""
    from clmae import checkpoint, dist
    from clmae.ds_engines import build_engines
    from clmae.masking import build_models
    from clmae.step import optimizer_step

    env = dist.init("gloo", 30)
    cfg = load_config(None, [f"model.name={model}", f"train.ds_config=zero{stage}_fp32", "data.batch_size=1"])
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, steps_per_epoch=100, world_size=env.world_size)
    size = mae.patch_embed.img_size[0]
    optimizer_step(engines, [torch.randn(1, 3, size, size)], 1.0, cfg)
    state = checkpoint.ClientState(0, 1, 1, env.world_size, None, cfg.to_dict())
    checkpoint.save(run_dir, engines.as_dict(), state, keep_last=1)
    dist.shutdown()


def trained_state_bytes(model: str) -> int:
    from clmae.masking import build_models

    cfg = load_config(None, [f"model.name={model}"])
    with torch.device("meta"):
        modules = [m for m in build_models(cfg) if m is not None]
    return 16 * sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16", choices=MODEL_NAMES)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage of the checkpoint")
    parser.add_argument("--estimate", nargs="*", default=["vit_large_patch16", "vit_huge_patch14"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        save_checkpoint(args.model, args.stage, args.worker)
        return 0

    from clmae.checkpoint import find_latest
    from clmae.elastic import convert_to_universal, universal_dir

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        start = time.perf_counter()
        subprocess.run(
            [*command, "--model", args.model, "--stage", str(args.stage), "--worker", str(run_dir)], check=True, env=env
        )
        save_seconds = time.perf_counter() - start
        step_dir = find_latest(run_dir)
        start = time.perf_counter()
        convert_to_universal(step_dir)
        seconds = time.perf_counter() - start
        engines = {}
        for engine in ("mae", "cmm"):
            files = [f for f in (step_dir / engine).rglob("*") if f.is_file()]
            converted = [f for f in universal_dir(step_dir, engine).rglob("*") if f.is_file()]
            engines[engine] = {
                "checkpoint_gib": sum(f.stat().st_size for f in files) / 2**30,
                "universal_gib": sum(f.stat().st_size for f in converted) / 2**30,
            }
    measured_bytes = trained_state_bytes(args.model)
    per_gib = seconds / (measured_bytes / 2**30)
    result = {
        "model": args.model,
        "zero_stage": args.stage,
        "save_seconds_2_ranks": save_seconds,
        "conversion_seconds": seconds,
        "engines": engines,
        "trained_state_gib": measured_bytes / 2**30,
        "estimates": {
            name: {
                "trained_state_gib": trained_state_bytes(name) / 2**30,
                "seconds": per_gib * trained_state_bytes(name) / 2**30,
            }
            for name in args.estimate
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)  # no interpreter teardown: it can abort a finished 2-rank run (clmae/cli.py)

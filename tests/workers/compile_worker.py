"""Run by tests/test_compile.py in one process (gloo, CPU): two optimiser steps of MAE and of CL-MAE through
clmae's engines (zero2_fp32), with and without train.compile, from the same seed and images. Writes the metrics,
the final weights, the modules' state-dict keys and the keys of the saved DeepSpeed checkpoint to OUT_DIR.

usage: compile_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from clmae import dist
from clmae.cli import run_main
from clmae.config import load_config
from clmae.ds_engines import build_engines
from clmae.masking import build_models
from clmae.step import optimizer_step

STEPS = 2


def run(method: str, compile_blocks: bool, out_dir: Path, env) -> dict:
    overrides = ["train.ds_config=zero2_fp32", "data.batch_size=8", f"train.compile={str(compile_blocks).lower()}"]
    if method == "mae":
        overrides.append("masking.mode=random")
    cfg = load_config("tiny_digits", overrides)
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, steps_per_epoch=10, world_size=env.world_size)
    images = torch.randn(STEPS, 8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the random masks
    metrics, seconds = [], []
    for step in range(STEPS):
        start = time.perf_counter()
        got = optimizer_step(engines, [images[step]], 0.5, cfg)
        seconds.append(time.perf_counter() - start)
        metrics.append({name: value.item() for name, value in got.items()})
    tag = f"{method}_{'compiled' if compile_blocks else 'eager'}"
    keys = {}
    for name, engine in engines.as_dict().items():
        engine.save_checkpoint(str(out_dir / tag / name), tag="step")
        saved = torch.load(out_dir / tag / name / "step" / "mp_rank_00_model_states.pt", weights_only=False)
        keys[name] = {"module": sorted(engine.module.state_dict()), "checkpoint": sorted(saved["module"])}
    weights = {
        f"{name}.{key}": value.detach().float().clone()
        for name, engine in engines.as_dict().items()
        for key, value in engine.module.state_dict().items()
    }
    torch.save(weights, out_dir / f"{tag}.pt")
    return {"metrics": metrics, "keys": keys, "seconds": seconds}


def main() -> None:
    out_dir = Path(sys.argv[1])
    env = dist.init("gloo")
    try:
        results = {}
        for method in ("mae", "clmae"):
            for compile_blocks in (False, True):
                results[f"{method}_{'compiled' if compile_blocks else 'eager'}"] = run(
                    method, compile_blocks, out_dir, env
                )
        (out_dir / "results.json").write_text(json.dumps(results))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    # Ends without the interpreter's teardown, which can abort a 2-rank run that finished well (clmae/cli.py).
    run_main(main, skip_teardown=True)

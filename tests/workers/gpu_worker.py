"""Run by tests/test_gpu.py (pytest -m gpu) in one process on a CUDA device: the bf16 step of both engines,
train.compile against eager, and a checkpoint saved and loaded on the GPU. Writes OUT_DIR/results.json.

usage: gpu_worker.py OUT_DIR [--device cpu]   (cpu: the same checks in fp32 at vit_tiny, to try the worker)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from clmae import dist
from clmae.cli import run_main
from clmae.config import load_config
from clmae.ds_engines import build_engines
from clmae.masking import build_models
from clmae.step import optimizer_step

STEPS = 3


def engines_for(method: str, cuda: bool, compile_blocks: bool = False):
    model, ds_config = ("vit_base_patch16", "zero2_bf16") if cuda else ("vit_tiny", "zero2_fp32")
    overrides = [f"model.name={model}", "data.batch_size=16", f"train.ds_config={ds_config}"]
    overrides += [f"train.compile={str(compile_blocks).lower()}"] + (["masking.mode=random"] if method == "mae" else [])
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cuda" if cuda else "cpu")
    with device:
        mae, cmm = build_models(cfg)
    return cfg, build_engines(cfg, mae, cmm, steps_per_epoch=100, world_size=1)


def steps(cfg, engines, images: torch.Tensor, seed: int = 5) -> list[dict]:
    torch.manual_seed(seed)
    return [
        {k: v.item() for k, v in optimizer_step(engines, [images[i]], 0.5, cfg).items()} for i in range(len(images))
    ]


def weights(engines) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().float().cpu().clone()
        for name, engine in engines.as_dict().items()
        for key, value in engine.module.state_dict().items()
    }


def main() -> None:
    out_dir, cuda = Path(sys.argv[1]), "--device" not in sys.argv
    env = dist.init("nccl" if cuda else "gloo")
    results: dict = {}
    try:
        for method in ("mae", "clmae"):
            cfg, engines = engines_for(method, cuda)
            size = engines.mae.module.patch_embed.img_size
            images = torch.randn(STEPS + 1, 16, 3, *size, generator=torch.Generator().manual_seed(3)).to(env.device)
            record = {"dtype": str(engines.dtype), "device": str(next(engines.mae.module.parameters()).device)}
            record["eager"] = steps(cfg, engines, images[:STEPS])
            # A checkpoint of every engine, loaded into fresh engines on the GPU: the next step must match.
            for name, engine in engines.as_dict().items():
                engine.save_checkpoint(str(out_dir / method / name), tag="ckpt")
            after_save = steps(cfg, engines, images[STEPS:], seed=9)
            saved_weights = weights(engines)
            cfg, loaded = engines_for(method, cuda)
            for name, engine in loaded.as_dict().items():
                engine.load_checkpoint(str(out_dir / method / name), tag="ckpt")
            record["checkpoint_next_step_equal"] = steps(cfg, loaded, images[STEPS:], seed=9) == after_save
            record["checkpoint_weights_equal"] = all(
                torch.equal(value, saved_weights[key]) for key, value in weights(loaded).items()
            )
            del engines, loaded
            cfg, compiled = engines_for(method, cuda, compile_blocks=True)
            record["compiled"] = steps(cfg, compiled, images[:STEPS])
            del compiled
            results[method] = record
        (out_dir / "results.json").write_text(json.dumps(results))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    # Ends without the interpreter's teardown, which can abort a 2-rank run that finished well (clmae/cli.py).
    run_main(main, skip_teardown=True)

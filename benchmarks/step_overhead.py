"""Kernel launches per optimiser step: clmae's DeepSpeed engines against a plain PyTorch step of the same model.

A GPU step is fast when the GPU never waits for the CPU to launch its next kernel. What launches kernels is the
ops the step dispatches, and their number is a property of the code, not of the machine: counted on a CPU it is
exact for a GPU too (the profile of the H200 run agrees: about 7,450 kernel launches per ViT-L/16 MAE step through
`zero2_bf16`, where this script counts 8,227 ops). So this runs anywhere, in minutes, and a CI test holds it.

For each model, method (MAE, CL-MAE) and ds_config (every shipped `*_bf16` file by default), one optimiser step of
each engine through clmae.step.optimizer_step, the training loop's own, is counted under a TorchDispatchMode:

- ops: every op that launches a kernel, forward, backward, optimiser, gradient reduction and norm together, views
  and allocations excluded (they launch nothing);
- host syncs: reads of device values into Python (`aten::_local_scalar_dense`, `aten::nonzero`), where the CPU
  stops until the GPU is done; counted once per tensor storage read, since on a GPU a loop of `.item()` over a
  tensor is written as one copy to the host first (`x.cpu()`, a no-op on a CPU) and then reads host memory.

The plain step beside it is benchmarks/_common.PlainStep (fp32 weights, bf16 autocast, fused AdamW, the same
parameter groups and clipping); the ratio engines / plain is what a GPU pays for the engines in launches. The
fourth step is the one counted (see `count`). The counts do not depend on the image
size or the batch (the ops are the same, only their sizes change), so `--img-size` small makes a count of ViT-H
quick on a CPU; the default is each model's own size.

    python benchmarks/step_overhead.py                      # B/16, L/16, H/14; MAE and CL-MAE; zero{1,2,3}_bf16
    python benchmarks/step_overhead.py --img-size 64 --check --json overhead.json

--check exits 1 when a ratio is above its target (ZeRO-1 and ZeRO-2: 1.5, ZeRO-3: 2.5) or when an engine step
has a host sync per parameter tensor (more syncs than TARGET_SYNCS). Each model runs in a fresh process.

Time on a 2-core CPU: about 1 minute for vit_tiny, 4 for ViT-B/16 at --img-size 64.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from _common import LAUNCHER_VARS, PlainStep, run_in_fresh_process
from torch.utils._python_dispatch import TorchDispatchMode

from clmae.cli import run_main
from clmae.config import MODEL_NAMES, load_config
from clmae.ds_engines import DS_CONFIG_DIR

METHODS = ("mae", "clmae")
LABELS = {"mae": "MAE", "clmae": "CL-MAE"}
# Ratio of the engines' ops to the plain step's, per ZeRO stage. ZeRO-3 gathers and releases each parameter's
# shards around every use, in forward and backward, so it launches more by design.
TARGET_RATIO = {1: 1.5, 2: 1.5, 3: 2.5}
# Host syncs per iteration allowed, per ZeRO stage: a few per engine step (DeepSpeed reads the norm's validity),
# never one per parameter tensor (a ViT-B MAE has 252). ZeRO-3 adds 3 per trace it records (it compares the module
# order across ranks); with CL-MAE it records the MAE's trace again every iteration, since the MAE's module runs
# in both steps and DeepSpeed finds the order changed: 18 syncs, whatever the depth.
TARGET_SYNCS = {1: 8, 2: 8, 3: 24}
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero"}
# Ops that allocate or describe a tensor without running a kernel on its data.
NO_KERNEL_OPS = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::detach",
    "aten::lift_fresh",
    "aten::set_",
    "aten::resize_",
    "aten::record_stream",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
}
WORKER_TIMEOUT_S = 3600


class LaunchCounter(TorchDispatchMode):
    """Counts the ops dispatched inside the block that launch a kernel (`ops`, by name in `by_op`) and the host
    syncs (`syncs`). Autograd's backward ops are dispatched through it too."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.read_storages: set[int] = set()

    @property
    def syncs(self) -> int:
        return len(self.read_storages)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.read_storages.add(args[0].untyped_storage().data_ptr())
        if name not in SYNC_OPS and name not in NO_KERNEL_OPS and not func.is_view:
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())


def count(step, warmup: int = 3) -> dict:
    """Ops and host syncs of one call of `step` after `warmup` calls: the steady state of a long run (the first
    step allocates the optimiser states; ZeRO-3 records its parameter trace over the first ones)."""
    for _ in range(warmup):
        step()
    counter = LaunchCounter()
    with counter:
        step()
    return {"ops": counter.ops, "syncs": counter.syncs, "top_ops": dict(counter.by_op.most_common(12))}


def shipped_bf16_configs() -> list[str]:
    return sorted(path.stem for path in DS_CONFIG_DIR.glob("*_bf16.json"))


def zero_stage(ds_config: str) -> int:
    from clmae.ds_engines import resolve_ds_config

    return int(json.loads(resolve_ds_config(ds_config).read_text())["zero_optimization"]["stage"])


# --------------------------------------------------------------------------------------------------
# The worker: one model, every method and config, in this process.
# --------------------------------------------------------------------------------------------------


def run_config(model: str, method: str, ds_config: str, img_size: int | None, clip_grad: float | None):
    overrides = [f"model.name={model}", "data.batch_size=1", f"train.ds_config={ds_config}"]
    if method == "mae":
        overrides.append("masking.mode=random")
    if img_size is not None:
        overrides.append(f"model.img_size={img_size}")
    if clip_grad is not None:
        overrides += [f"optim.clip_grad={clip_grad}", f"cmm_optim.clip_grad={clip_grad}"]
    return load_config(None, overrides)


def worker(args: argparse.Namespace) -> dict:
    from clmae import dist
    from clmae.ds_engines import build_engines
    from clmae.masking import build_models
    from clmae.step import optimizer_step

    env = dist.init("gloo")  # rank 0 of 1: the driver clears the launcher variables
    rows = []
    for method in args.methods:
        cfg = run_config(args.model, method, args.configs[0], args.img_size, args.clip_grad)
        torch.manual_seed(cfg.run.seed)
        mae, cmm = build_models(cfg)
        images = torch.randn(1, 3, *mae.patch_embed.img_size)
        tensors = sum(1 for p in mae.parameters() if p.requires_grad)
        start = time.perf_counter()
        plain_step = PlainStep(cfg, mae, cmm, bf16=True, global_batch=1)
        plain = count(functools.partial(plain_step, images))
        del mae, cmm, plain_step
        gc.collect()
        progress(f"  {args.model} {LABELS[method]} plain: {plain['ops']} ops ({time.perf_counter() - start:.0f} s)")
        for ds_config in args.configs:
            start = time.perf_counter()
            cfg = run_config(args.model, method, ds_config, args.img_size, args.clip_grad)
            torch.manual_seed(cfg.run.seed)
            mae, cmm = build_models(cfg)
            engines = build_engines(cfg, mae, cmm, steps_per_epoch=1000, world_size=env.world_size)
            counted = count(functools.partial(optimizer_step, engines, [images], 1.0, cfg))
            del engines, mae, cmm
            gc.collect()
            stage = zero_stage(ds_config)
            row = {
                "model": args.model,
                "method": method,
                "ds_config": ds_config,
                "zero_stage": stage,
                "mae_param_tensors": tensors,
                "engines": counted,
                "plain": plain,
                "ratio": counted["ops"] / plain["ops"],
                "target_ratio": TARGET_RATIO[stage],
                "target_syncs": TARGET_SYNCS[stage],
            }
            rows.append(row)
            seconds = time.perf_counter() - start
            progress(f"  {args.model} {LABELS[method]} {ds_config}: {counted['ops']} ops ({seconds:.0f} s)")
    dist.shutdown()
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def within_targets(row: dict) -> list[str]:
    """What is off target in a row, in words (empty: on target)."""
    problems = []
    if row["ratio"] > row["target_ratio"]:
        problems.append(f"ratio {row['ratio']:.2f} > {row['target_ratio']}")
    if row["engines"]["syncs"] > TARGET_SYNCS[row["zero_stage"]]:
        problems.append(f"{row['engines']['syncs']} host syncs > {TARGET_SYNCS[row['zero_stage']]}")
    return problems


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | ds_config | param tensors (MAE) | engines: ops | plain: ops | ratio | target | "
        "engines: host syncs | plain: host syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        eng, plain = row["engines"], row["plain"]
        mark = "" if not within_targets(row) else " (off target)"
        lines.append(
            f"| {row['model']} | {LABELS[row['method']]} | {row['ds_config']} | {row['mae_param_tensors']} | "
            f"{eng['ops']:,} | {plain['ops']:,} | {row['ratio']:.2f}{mark} | {row['target_ratio']} | "
            f"{eng['syncs']} | {plain['syncs']} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_models = ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]
    parser.add_argument("--models", nargs="+", default=default_models, choices=MODEL_NAMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--configs", nargs="+", help="ds_config names or paths (default: every shipped *_bf16)")
    parser.add_argument("--img-size", type=int, help="image side in pixels (default: each model's own)")
    parser.add_argument("--clip-grad", type=float, help="optim.clip_grad of both modules (default: the config's)")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a row is off its target")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODEL_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = args.configs or shipped_bf16_configs()
    for ds_config in args.configs:
        try:
            zero_stage(ds_config)
        except Exception as err:  # a missing file, bad JSON, no zero_optimization.stage
            parser.error(f"--configs {ds_config}: {err}")
    if args.img_size is not None and args.img_size < 1:
        parser.error("--img-size must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        args.result.write_text(json.dumps(worker(args)))
        return 0
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""  # counted on the CPU: the same ops as on a GPU, no GPU needed
    rows = []
    for model in args.models:
        progress(f"{model}: counting (a fresh process)")
        command = ["--worker", "--model", model, "--methods", *args.methods, "--configs", *args.configs]
        for flag, value in (("--img-size", args.img_size), ("--clip-grad", args.clip_grad)):
            if value is not None:
                command += [flag, str(value)]
        record, code, output = run_in_fresh_process(os.path.abspath(__file__), command, env, WORKER_TIMEOUT_S)
        if record is None:
            print(f"error: counting {model} failed (exit code {code}):\n{output}", file=sys.stderr)
            return 1
        rows += record["rows"]
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    off = [(row, problems) for row in rows if (problems := within_targets(row))]
    for row, problems in off:
        print(f"off target: {row['model']} {LABELS[row['method']]} {row['ds_config']}: {'; '.join(problems)}")
    return 1 if args.check and off else 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)  # no interpreter teardown: it can abort a finished 2-rank run (clmae/cli.py)

"""Run by tests/test_ds_engines.py under `torchrun --nproc_per_node 2` (gloo, CPU).

For ZeRO stages 1, 2 and 3 it trains the tiny CL-MAE for a few iterations through the two DeepSpeed
engines exactly as clmae/train.py does, and checks on the way that
- the module that is not being stepped is bitwise unchanged by the other module's step,
- each engine's optimiser holds state for its own module only,
then writes the final weights of both modules for the test to compare with a single-process reference.
It also trains ZeRO-2 through the training loop's own `optimizer_step`: with the default settings (the test
holds it bitwise to the steps written out above), with gradient accumulation (train.accum_steps=2), and with
the cheaper curriculum (the CMM's step on one iteration in 2, on half of each micro-batch). It builds every
ds_configs file into a DeepSpeedConfig and runs one bf16 iteration. For every bf16 and fp32 file it compares
clmae's one-kernel gradient norm with DeepSpeed's own, on the same gradients, and checks that a non-finite
gradient under a finite loss reaches the step's metrics (grad_norms.json).

usage: ds_engines_worker.py OUT_DIR ITERATIONS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_fp32_param

from clmae import dist
from clmae.cli import run_main
from clmae.config import load_config
from clmae.ds_engines import DS_CONFIG_DIR, build_ds_config, build_engines
from clmae.masking import build_models, masking_step_due
from clmae.method import cmm_step, mae_step
from clmae.step import optimizer_step

PER_RANK_BATCH = 4
ACCUM_STEPS = 2  # the accumulation run: 2 micro-batches of 2 images per rank and optimiser step
STEPS_PER_EPOCH = 10
CHEAPER = ("masking.cmm_every=2", "masking.cmm_batch_fraction=0.5")


def config_for(ds_config: str, accum_steps: int = 1, extra: tuple[str, ...] = ()):
    """The test recipe; with `accum_steps` the per-rank batch is cut into that many micro-batches, so the
    optimiser steps see the same images whatever the accumulation."""
    return load_config(
        "tiny_digits",
        [
            f"train.ds_config={ds_config}",
            f"train.accum_steps={accum_steps}",
            f"data.batch_size={PER_RANK_BATCH // accum_steps}",
            "optim.warmup_epochs=0.2",  # the lr changes every step, so the schedules are compared too
            "optim.clip_grad=1.0",
            "cmm_optim.clip_grad=0.5",
            # lr = base_lr * 8 / 256: large enough that 4 steps move every weight measurably.
            "optim.base_lr=0.5",
            "cmm_optim.base_lr=1.0",
            *extra,
        ],
    )


def global_batches(iterations: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(PER_RANK_BATCH * 2, 3, 32, 32, generator=generator) for _ in range(iterations)]


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full. ZeRO-3 keeps only a shard of each on a rank: read its fp32
    master copy through DeepSpeed (a collective), which is what the next forward will use."""
    state = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param) if hasattr(param, "ds_id") else param
        state[name] = full.detach().clone().float()
    return state


def optimizer_state_numel(engine) -> int:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(state["exp_avg"].numel() for state in base.state.values() if "exp_avg" in state)


def train_stage(ds_config: str, iterations: int, out_dir: Path, env) -> None:
    cfg = config_for(ds_config)
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    mae_numel = sum(p.numel() for p in mae.parameters() if p.requires_grad)
    cmm_numel = sum(p.numel() for p in cmm.parameters() if p.requires_grad)
    engines = build_engines(cfg, mae, cmm, STEPS_PER_EPOCH, env.world_size)
    losses = []
    for batch in global_batches(iterations):
        images = batch.chunk(env.world_size)[env.rank]
        cmm_before = full_state(engines.masking["cmm"].module)
        loss, _ = mae_step(engines.mae, engines.masking["cmm"].module, images, cfg)
        engines.mae.backward(loss)
        engines.mae.step()
        assert all(torch.equal(cmm_before[n], v) for n, v in full_state(engines.masking["cmm"].module).items()), (
            f"{ds_config}: the MAE step changed the masking module"
        )
        mae_before = full_state(engines.mae.module)
        cmm_loss, _ = cmm_step(engines.mae.module, engines.masking["cmm"], images, 0.5, cfg)
        engines.masking["cmm"].backward(cmm_loss)
        engines.masking["cmm"].step()
        assert all(torch.equal(mae_before[n], v) for n, v in full_state(engines.mae.module).items()), (
            f"{ds_config}: the CMM step changed the MAE"
        )
        losses.append([loss.item(), cmm_loss.item()])

    # Each optimiser's Adam moments cover its own module's shard only (plus alignment padding).
    for engine, own, other in ((engines.mae, mae_numel, cmm_numel), (engines.masking["cmm"], cmm_numel, mae_numel)):
        held = optimizer_state_numel(engine)
        assert own / env.world_size <= held <= own / env.world_size + 1024, (ds_config, held, own)
        assert held < (own + other) / env.world_size, (ds_config, held)

    mae_final, cmm_final = full_state(engines.mae.module), full_state(engines.masking["cmm"].module)
    lrs = {"mae": engines.mae.get_lr()[0], "cmm": engines.masking["cmm"].get_lr()[0]}
    if env.rank == 0:
        torch.save({"mae": mae_final, "cmm": cmm_final, "losses": losses, "lrs": lrs}, out_dir / f"{ds_config}.pt")
    tdist.barrier()


def train_accumulated(accum_steps: int, iterations: int, out_dir: Path, env, extra: tuple[str, ...] = ()) -> str:
    """ZeRO-2, each optimiser step through clmae.step.optimizer_step as the training loop takes it, with
    `accum_steps` micro-batches and the config overrides `extra`. Writes <name>.pt, returns the name."""
    from clmae.step import optimizer_step

    cfg = config_for("zero2_fp32", accum_steps, extra)
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, STEPS_PER_EPOCH, env.world_size)
    assert engines.global_batch == PER_RANK_BATCH * env.world_size, engines.global_batch
    losses, steps = [], []
    for step, batch in enumerate(global_batches(iterations), start=1):
        micro_batches = list(batch.chunk(env.world_size)[env.rank].chunk(accum_steps))
        metrics = optimizer_step(engines, micro_batches, 0.5, cfg, masking_step=masking_step_due(cfg, step))
        steps.append(sorted(metrics))
        cmm_loss = metrics.get("cmm/loss_cmm", torch.tensor(float("nan")))
        rank_losses = torch.stack([metrics["mae/loss"], cmm_loss])
        tdist.all_reduce(rank_losses)  # the mean over ranks, as the training loop logs it
        losses.append((rank_losses / env.world_size).tolist())
    mae_final, cmm_final = full_state(engines.mae.module), full_state(engines.masking["cmm"].module)
    lrs = {"mae": engines.mae.get_lr()[0], "cmm": engines.masking["cmm"].get_lr()[0]}
    name = f"zero2_fp32_accum{accum_steps}" + ("_cheaper" if extra else "")
    if env.rank == 0:
        result = {"mae": mae_final, "cmm": cmm_final, "losses": losses, "lrs": lrs, "metrics": steps}
        torch.save(result, out_dir / f"{name}.pt")
    tdist.barrier()
    return name


def check_every_ds_config(env) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config("tiny_digits")
    for path in sorted(DS_CONFIG_DIR.glob("*.json")):
        stage, precision = path.stem.split("_")
        ds = DeepSpeedConfig(build_ds_config(load_config("tiny_digits", [f"train.ds_config={path.stem}"]), 2, 1.0))
        assert ds.zero_optimization_stage == int(stage.removeprefix("zero")), path
        assert ds.bfloat16_config.enabled == (precision == "bf16"), path
        assert ds.float16_config.enabled == (precision == "fp16"), path
        assert ds.train_batch_size == cfg.data.batch_size * env.world_size, path
    if env.rank == 0:
        print(f"ds_configs checked: {len(list(DS_CONFIG_DIR.glob('*.json')))}", flush=True)


def bf16_iteration(env) -> None:
    """bf16 on CPU is slow but runs: one iteration of both steps must give finite losses."""
    cfg = config_for("zero2_bf16")
    torch.manual_seed(0)
    mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, STEPS_PER_EPOCH, env.world_size)
    images = global_batches(1)[0].chunk(env.world_size)[env.rank].to(engines.dtype)
    loss, _ = mae_step(engines.mae, engines.masking["cmm"].module, images, cfg)
    engines.mae.backward(loss)
    engines.mae.step()
    cmm_loss, _ = cmm_step(engines.mae.module, engines.masking["cmm"], images, -0.5, cfg)
    engines.masking["cmm"].backward(cmm_loss)
    engines.masking["cmm"].step()
    assert engines.dtype == torch.bfloat16 and torch.isfinite(loss) and torch.isfinite(cmm_loss)
    if env.rank == 0:
        print(f"bf16 iteration: mae {loss.item():.4f} cmm {cmm_loss.item():.4f}", flush=True)


def grad_norm_pairs(ds_config: str, env) -> dict:
    """The MAE engine's gradient norm after one backward, by clmae's foreach norm (the engine's method) and by
    DeepSpeed's own per-tensor method (the class's), on the same gradients; then a step whose loss is finite and
    one gradient NaN (a hook): the step's metrics must show it."""
    cfg = config_for(ds_config)
    torch.manual_seed(0)
    mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, STEPS_PER_EPOCH, env.world_size)
    engine, optimizer = engines.mae, engines.mae.optimizer
    images = global_batches(1)[0].chunk(env.world_size)[env.rank]
    loss, _ = mae_step(engine, engines.masking["cmm"].module, images, cfg)
    engine.backward(loss)
    record = {"replaced": "get_grad_norm_direct" in vars(optimizer)}
    if record["replaced"]:
        stage3 = engine.zero_optimization_stage() == 3
        params = optimizer.fp16_groups if stage3 else optimizer.params_in_partition
        ours, theirs = [], []
        for grads, group in zip(optimizer.averaged_gradients.values(), params, strict=True):
            ours.append(optimizer.get_grad_norm_direct(grads, group).item())
            theirs.append(type(optimizer).get_grad_norm_direct(optimizer, grads, group).item())
        record.update(ours=ours, deepspeed=theirs)
    engine.step()
    poisoned = next(p for p in engine.module.parameters() if p.requires_grad)
    handle = poisoned.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    metrics = optimizer_step(engines, [images], 0.5, cfg)
    handle.remove()
    record.update(
        nan_step_loss=metrics["mae/loss"].item(),
        nan_step_grad_norm=metrics["grad_norm/mae"].item(),
    )
    return record


def main() -> None:
    out_dir, iterations = Path(sys.argv[1]), int(sys.argv[2])
    env = dist.init()
    try:
        check_every_ds_config(env)
        for stage in (1, 2, 3):
            train_stage(f"zero{stage}_fp32", iterations, out_dir, env)
            if env.rank == 0:
                print(f"zero{stage}_fp32 trained", flush=True)
            if stage == 2:
                # Next to its written-out twin: ZeRO-3 replaces torch.nn.functional.linear for the rest of the process
                train_accumulated(1, iterations, out_dir, env)
        train_accumulated(ACCUM_STEPS, iterations, out_dir, env)
        train_accumulated(1, iterations, out_dir, env, CHEAPER)
        bf16_iteration(env)
        norms = {name: grad_norm_pairs(name, env) for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16", "zero2_fp32")}
        if env.rank == 0:
            (out_dir / "grad_norms.json").write_text(json.dumps(norms))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    # Ends without the interpreter's teardown, which can abort a 2-rank run that finished well (clmae/cli.py).
    run_main(main, skip_teardown=True)

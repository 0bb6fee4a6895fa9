"""Two DeepSpeed engines in alternating steps, proven against a single-process reference.

One 2-rank launch (tests/workers/ds_engines_worker.py) trains under ZeRO 1, 2 and 3; this file computes
the same math in one process with plain torch (AdamW, the same LR schedule and clipping) and compares.
"The same math" for a loss that is not a plain mean (L_rec_soft, L_KL, L_div are per-rank batch
statistics) is the mean over ranks of each rank's loss, which is what averaging gradients computes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clmae.config import ConfigError, load_config
from clmae.ds_engines import (
    DS_CONFIG_DIR,
    WarmupCosine,
    build_ds_config,
    param_groups,
    peak_lr,
    precision_dtype,
    resolve_ds_config,
)
from clmae.masking import build_models
from clmae.method import cmm_step, mae_step
from tests.workers.ds_engines_worker import (
    ACCUM_STEPS,
    CHEAPER,
    PER_RANK_BATCH,
    STEPS_PER_EPOCH,
    config_for,
    global_batches,
)

ITERATIONS = 4
WORLD = 2
STAGES = ("zero1_fp32", "zero2_fp32", "zero3_fp32")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("engines")
    worker = Path(__file__).parent / "workers" / "ds_engines_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    result = subprocess.run(
        [*TORCHRUN, str(worker), str(out_dir), str(ITERATIONS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return out_dir, result.stdout


def reference_training(accum_steps: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """The same iterations in one process: per-rank losses averaged, plain torch AdamW. With `accum_steps`,
    each rank's images are that many micro-batches and the loss is the mean over all micro-batches, which
    is what accumulating their gradients computes. With masking.cmm_every = k in `extra` the CMM steps on
    iterations 1, 1 + k, ... and its schedule counts those steps; with masking.cmm_batch_fraction = f, on
    the first f of each micro-batch's images."""
    cfg = config_for("zero2_fp32", accum_steps, extra)
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    global_batch = PER_RANK_BATCH * WORLD
    every, fraction = cfg.masking.cmm_every, cfg.masking.cmm_batch_fraction
    optimisers, schedulers = [], []
    for module, opt, steps in (
        (mae, cfg.optim, STEPS_PER_EPOCH),
        (cmm, cfg.cmm_optim_resolved(), STEPS_PER_EPOCH / every),
    ):
        peak = peak_lr(opt, global_batch)
        optimiser = torch.optim.AdamW(
            param_groups(module, opt.weight_decay, opt.no_decay_names), lr=peak, betas=opt.betas
        )
        schedule = WarmupCosine(peak, opt.min_lr, opt.warmup_epochs, cfg.train.epochs, steps)
        optimisers.append(optimiser)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimiser, schedule))
    clips = (cfg.optim.clip_grad, cfg.cmm_optim_resolved().clip_grad)
    losses = []
    for iteration, batch in enumerate(global_batches(ITERATIONS)):
        chunks = batch.chunk(WORLD * accum_steps)
        mae_loss = sum(mae_step(mae, cmm, chunk, cfg)[0] for chunk in chunks) / len(chunks)
        mae_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in mae.parameters() if p.requires_grad], clips[0])
        optimisers[0].step()
        optimisers[0].zero_grad()
        schedulers[0].step()
        if iteration % every:
            losses.append([mae_loss.item(), float("nan")])
            continue
        used = round(len(chunks[0]) * fraction)
        cmm_loss = sum(cmm_step(mae, cmm, chunk[:used], 0.5, cfg)[0] for chunk in chunks) / len(chunks)
        cmm_loss.backward()
        assert all(p.grad is None for p in mae.parameters())
        torch.nn.utils.clip_grad_norm_(list(cmm.parameters()), clips[1])
        optimisers[1].step()
        optimisers[1].zero_grad()
        schedulers[1].step()
        losses.append([mae_loss.item(), cmm_loss.item()])
    return {
        "mae": {n: p.detach() for n, p in mae.named_parameters() if p.requires_grad},
        "cmm": {n: p.detach() for n, p in cmm.named_parameters() if p.requires_grad},
        "losses": losses,
        "lrs": {"mae": optimisers[0].param_groups[0]["lr"], "cmm": optimisers[1].param_groups[0]["lr"]},
    }


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_two_engines_match_single_process_reference(distributed_results, stage):
    out_dir, _ = distributed_results
    assert_matches_reference(torch.load(out_dir / f"{stage}.pt", weights_only=True), reference_training(), stage)


@pytest.mark.distributed
def test_gradient_accumulation_matches_the_large_batch_reference(distributed_results):
    """train.accum_steps=2 through the training loop's optimizer_step: each engine takes one optimiser step
    per 2 micro-batches, the CMM's micro-steps all see the updated MAE, and the lr follows optimiser steps."""
    out_dir, _ = distributed_results
    got = torch.load(out_dir / f"zero2_fp32_accum{ACCUM_STEPS}.pt", weights_only=True)
    want = reference_training(ACCUM_STEPS)
    assert_matches_reference(got, want, f"zero2_fp32 accum_steps={ACCUM_STEPS}")
    # Logged losses are the micro-batch means, so they equal the reference's.
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=1e-5)
    # Without accumulation the same images give different weights (the losses are per-micro-batch
    # statistics): the comparison above tells the two apart.
    plain = reference_training()
    assert max((plain["cmm"][n] - v).abs().max().item() for n, v in want["cmm"].items()) > 1e-3


@pytest.mark.distributed
def test_the_default_step_is_the_papers_iteration_bit_for_bit(distributed_results):
    """optimizer_step with the defaults (masking.cmm_every 1, masking.cmm_batch_fraction 1) against the MAE
    step and the CMM step written out on the same whole batches (the worker's ZeRO-2 run): bitwise the same
    weights and learning rates, and every metric on every step."""
    out_dir, _ = distributed_results
    got = torch.load(out_dir / "zero2_fp32_accum1.pt", weights_only=True)
    want = torch.load(out_dir / "zero2_fp32.pt", weights_only=True)
    for module in ("mae", "cmm"):
        assert got[module].keys() == want[module].keys()
        assert [name for name, value in want[module].items() if not torch.equal(got[module][name], value)] == []
    assert got["lrs"] == want["lrs"]
    assert all({"cmm/loss_cmm", "grad_norm/cmm", "grad_norm/mae", "mae/loss"} <= set(keys) for keys in got["metrics"])


@pytest.mark.distributed
def test_cmm_every_and_batch_fraction_match_the_single_process_reference(distributed_results):
    """masking.cmm_every=2 and masking.cmm_batch_fraction=0.5 through optimizer_step: the CMM steps on iterations
    1 and 3 only, on the first half of each rank's images, with its learning rate on the paper's line."""
    out_dir, _ = distributed_results
    got = torch.load(out_dir / "zero2_fp32_accum1_cheaper.pt", weights_only=True)
    want = reference_training(extra=CHEAPER)
    assert_matches_reference(got, want, "zero2_fp32 with " + " ".join(CHEAPER))
    stepped = [step for step, keys in enumerate(got["metrics"], start=1) if "cmm/loss_cmm" in keys]
    assert stepped == [1, 3]
    assert [step for step, keys in enumerate(got["metrics"], start=1) if "grad_norm/cmm" in keys] == stepped
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=1e-5, equal_nan=True
    )
    # The paper's iteration on the same images ends elsewhere: the comparison above tells the two apart.
    paper = reference_training()
    assert max((paper["cmm"][n] - v).abs().max().item() for n, v in want["cmm"].items()) > 1e-3


def assert_matches_reference(got: dict, want: dict, label: str) -> None:
    # Rank-mean of the per-rank losses, as the reference defines its loss.
    assert got["lrs"] == pytest.approx(want["lrs"], rel=1e-6)
    for module in ("mae", "cmm"):
        assert got[module].keys() == want[module].keys()
        for name, value in want[module].items():
            actual = got[module][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias shifts every score of a query equally, which softmax ignores: its true gradient
                # is 0 and Adam turns the rounding noise left in it into full-size steps of random sign, in
                # any two implementations. Compare the query and value biases only.
                width = value.shape[0] // 3
                keep = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])
                actual, value = actual[keep], value[keep]
            torch.testing.assert_close(
                actual, value, rtol=1e-4, atol=5e-5, msg=lambda m, where=f"{label} {module}.{name}": f"{where}: {m}"
            )
    # Both modules really moved, so the comparison above is not between two untouched copies.
    cfg = config_for("zero2_fp32")  # every run starts from these weights
    torch.manual_seed(cfg.run.seed)
    for module, initial in zip(("mae", "cmm"), build_models(cfg), strict=True):
        moved = [(got[module][n] - p).abs().max().item() for n, p in initial.named_parameters() if p.requires_grad]
        assert min(moved) > 0 and max(moved) > 1e-3, f"{label} {module}"


@pytest.mark.distributed
def test_every_ds_config_loads_and_bf16_runs(distributed_results):
    _, stdout = distributed_results
    assert f"ds_configs checked: {len(list(DS_CONFIG_DIR.glob('*.json')))}" in stdout
    assert "bf16 iteration: mae" in stdout


@pytest.mark.distributed
def test_foreach_grad_norm_equals_deepspeeds_and_the_step_reports_a_nan_gradient(distributed_results):
    """clmae replaces DeepSpeed's per-tensor gradient norm (ZeRO-2/3) with one foreach norm: the same value to
    1e-6 relative on the same gradients of 2 ranks. With DeepSpeed's per-tensor overflow check off in the bf16
    files, a NaN gradient under a finite loss must still reach the step's metrics, for the NaN guard."""
    out_dir, _ = distributed_results
    norms = json.loads((out_dir / "grad_norms.json").read_text())
    # ZeRO-1 with bf16 is DeepSpeed's BF16_Optimizer, whose norm goes another way; it is left as it is.
    assert {name for name, record in norms.items() if record["replaced"]} == {"zero2_bf16", "zero3_bf16", "zero2_fp32"}
    for name, record in norms.items():
        for ours, theirs in zip(record.get("ours", []), record.get("deepspeed", []), strict=True):
            assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-6), name
        assert torch.isfinite(torch.tensor(record["nan_step_loss"])), (name, record)
        assert math.isnan(record["nan_step_grad_norm"]) or math.isinf(record["nan_step_grad_norm"]), (name, record)


def test_bf16_files_leave_the_overflow_check_to_the_grad_norm():
    for path in sorted(DS_CONFIG_DIR.glob("*_bf16.json")):
        assert json.loads(path.read_text())["bf16"]["check_grad_overflow"] is False, path


def test_ds_configs_cover_every_stage_and_precision():
    names = {p.stem for p in DS_CONFIG_DIR.glob("*.json")}
    assert names == {f"zero{s}_{p}" for s in (1, 2, 3) for p in ("fp32", "bf16", "fp16")}
    for name in names:
        ds = build_ds_config(load_config("tiny_digits", [f"train.ds_config={name}"]), world_size=4, clip_grad=0.0)
        assert ds["train_batch_size"] == 64 * 4 and ds["gradient_accumulation_steps"] == 1
        expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name.split("_")[1]]
        assert precision_dtype(ds) == expected


def test_ds_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.ds_config: no file 'zero4_fp32'"):
        resolve_ds_config("zero4_fp32")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ConfigError, match="sets 'train_batch_size'"):
        build_ds_config(load_config("tiny_digits", [f"train.ds_config={bad}"]), 2, 0.0)


def test_lr_schedule_warmup_then_half_cycle_cosine():
    schedule = WarmupCosine(peak=1.0, min_lr=0.1, warmup_epochs=2, epochs=10, steps_per_epoch=5)
    assert schedule.lr(0) == 0.0
    assert schedule.lr(5) == pytest.approx(0.5)  # half-way through warmup
    assert schedule.lr(10) == pytest.approx(1.0)  # warmup done: the peak
    assert schedule.lr(30) == pytest.approx(0.55)  # half-way through the cosine
    assert schedule.lr(50) == pytest.approx(0.1)  # the end: min_lr
    cfg = load_config("tiny_digits", ["optim.base_lr=1e-3"])
    assert peak_lr(cfg.optim, 4096) == pytest.approx(0.016)


def test_weight_decay_groups_follow_mae_and_the_reference():
    """timm 0.3.2's rule as MAE and the reference use it: biases and 1-D parameters undecayed, everything else
    decayed, the cls and mask tokens included; the fixed position embeddings are in no group."""
    cfg = load_config("tiny_digits")
    mae, cmm = build_models(cfg)
    assert cfg.optim.no_decay_names == () and cfg.cmm_optim_resolved().no_decay_names == ()
    decay, no_decay = param_groups(mae, 0.05, cfg.optim.no_decay_names)
    names = {id(p): n for n, p in mae.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "cls_token", "mask_token"} <= decayed
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    grouped = decayed | {names[id(p)] for p in no_decay["params"]}
    assert "pos_embed" not in grouped and "decoder_pos_embed" not in grouped  # fixed: not optimised at all
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    cmm_decayed = {n for n, p in cmm.named_parameters() if any(p is q for q in param_groups(cmm, 0.05)[0]["params"])}
    assert "cls_token" in cmm_decayed
    # The setting exempts tokens by name (DeiT's and later timm's rule), for each engine.
    cfg = load_config("tiny_digits", ["optim.no_decay_names=[cls_token,mask_token]"])
    decay, _ = param_groups(mae, 0.05, cfg.optim.no_decay_names)
    assert not {"cls_token", "mask_token"} & {names[id(p)] for p in decay["params"]}
    assert cfg.cmm_optim_resolved().no_decay_names == ("cls_token", "mask_token")

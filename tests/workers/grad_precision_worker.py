"""Run by tests/test_ds_engines_precision.py under `torchrun --nproc_per_node 2` (gloo, CPU).

What does DeepSpeed do with bf16 gradients, per ZeRO stage? For every shipped `zero{1,2,3}_bf16` file,
it builds both of clmae's engines (`build_engines`, the MAE's and the masking module's) around a
probe module whose gradient is chosen per micro-batch and rank, accumulates ACCUM micro-batches, and reads
the full gradient back from each engine at the accumulation boundary (`safe_get_full_grad`).

The probe: loss = sum(w * x), so the gradient of w is x (times DeepSpeed's 1/ACCUM loss scale), exact in
bf16 for the powers of two used here. Columns of w test two roundings:
- even columns (accumulation): every rank sees 1 in micro-batch 0 and 2^-9 in the others. Each 2^-9 is
  below bf16's half-ulp at 1 (2^-8): accumulating in bf16 returns 1, fp32 returns 1 + 3 * 2^-9.
- odd columns (communication): rank 0 sees 1, rank 1 sees 2^-9, each in micro-batch 0 only. Each rank's
  own sum is exact in bf16; the sum over ranks 1 + 2^-9 is not, so a bf16 reduction returns 1.

Each stage runs three files: the shipped one, "absent" (the same without `data_types.grad_accum_dtype` and
`communication_data_type`: DeepSpeed's default) and "commbf16" (fp32 accumulation, bf16 communication).
Rank 0 writes {config: {engine: {"grad": fp32 tensor, "dtype": str}}} to OUT_DIR/grads.pt.

Then the tiny CL-MAE on zero2_bf16 engines, one iteration of both steps as the training loop runs them (fp32
images in): rank 0 writes the dtypes of the parameters, of m and of every loss term to OUT_DIR/dtypes.json.

usage: grad_precision_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from clmae import dist
from clmae.cli import run_main
from clmae.config import load_config
from clmae.ds_engines import DS_CONFIG_DIR, build_engines
from clmae.masking import build_models
from clmae.method import cmm_step, mae_step

ACCUM = 4
SHAPE = (4, 32)  # 128 values: each ZeRO shard (one per rank) holds columns of both kinds
SMALL = 2.0**-9


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(SHAPE))
        # A 1-D parameter too, so that both of build_engines' AdamW groups (decay, no decay) are non-empty.
        self.b = nn.Parameter(torch.zeros(SHAPE[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w.dtype)
        return (self.w * x).sum() + (self.b * x[0]).sum()


def micro_batch_grad(rank: int, micro: int) -> torch.Tensor:
    """x for (rank, micro-batch): the gradient of sum(w * x) before DeepSpeed's 1/ACCUM scale."""
    x = torch.zeros(SHAPE)
    x[:, 0::2] = 1.0 if micro == 0 else SMALL
    if micro == 0:
        x[:, 1::2] = 1.0 if rank == 0 else SMALL
    return x


def reference_grad(world: int) -> torch.Tensor:
    """What an fp32 data-parallel run computes: the mean over ranks and micro-batches, in float64."""
    total = sum(micro_batch_grad(r, m).double() for r in range(world) for m in range(ACCUM))
    return (total / (world * ACCUM)).float()


VARIANTS = {
    "shipped": None,
    # The keys removed: DeepSpeed's own default, both follow the model's dtype.
    "absent": {},
    # Isolates the communication: fp32 accumulation, bf16 reduction.
    "commbf16": {"grad_accum_dtype": "fp32", "communication_data_type": "bf16"},
}


def variant_file(shipped: Path, label: str, out_dir: Path) -> Path:
    """The shipped file with its gradient settings replaced by VARIANTS[label]."""
    if VARIANTS[label] is None:
        return shipped
    ds = json.loads(shipped.read_text())
    ds.pop("data_types", None)
    ds.pop("communication_data_type", None)
    if VARIANTS[label]:
        ds["data_types"] = {"grad_accum_dtype": VARIANTS[label]["grad_accum_dtype"]}
        ds["communication_data_type"] = VARIANTS[label]["communication_data_type"]
    path = out_dir / f"{shipped.stem}_{label}.json"
    if dist.is_main():
        path.write_text(json.dumps(ds))
    tdist.barrier()
    return path


def accumulate_and_read(ds_config: str, env) -> dict[str, dict]:
    cfg = load_config("tiny_digits", [f"train.ds_config={ds_config}", f"train.accum_steps={ACCUM}"])
    engines = build_engines(cfg, Probe(), Probe(), steps_per_epoch=10, world_size=env.world_size)
    out = {}
    for name, engine in engines.as_dict().items():
        for micro in range(ACCUM):
            engine.backward(engine(micro_batch_grad(env.rank, micro)))
            if micro < ACCUM - 1:
                engine.step()  # a non-boundary step only advances DeepSpeed's micro-step counter
        grad = safe_get_full_grad(engine.module.w)  # collective under ZeRO-3
        out[name] = {"grad": grad.detach().float().clone(), "dtype": str(grad.dtype)}
        engine.step()
    return out


def bf16_step_dtypes(env) -> dict[str, str]:
    cfg = load_config("tiny_digits", ["train.ds_config=zero2_bf16", "data.batch_size=4"])
    torch.manual_seed(0)
    mae, module = build_models(cfg)
    engines = build_engines(cfg, mae, module, steps_per_epoch=10, world_size=env.world_size)
    cmm = engines.masking["cmm"]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(env.rank))
    dtypes = {
        "mae_params": str(next(engines.mae.module.parameters()).dtype),
        "cmm_params": str(next(cmm.module.parameters()).dtype),
    }
    loss, metrics = mae_step(engines.mae, engines.strategy.scorer(cmm.module), images, cfg)
    dtypes.update({f"mae_step/{k}": str(v.dtype) for k, v in {"loss": loss, **metrics}.items()})
    engines.mae.backward(loss)
    engines.mae.step()
    with torch.no_grad():
        _, hidden, keep = engines.mae.module(images, cmm.module, soft=True)
    dtypes.update({"m": str(keep.dtype), "1-m": str(hidden.dtype)})
    loss, metrics = cmm_step(engines.mae.module, cmm, images, -0.5, cfg)
    dtypes.update({f"cmm_step/{k}": str(v.dtype) for k, v in {"loss": loss, **metrics}.items()})
    cmm.backward(loss)
    cmm.step()
    return dtypes


def main() -> None:
    out_dir = Path(sys.argv[1])
    env = dist.init()
    try:
        results = {"reference": reference_grad(env.world_size)}
        for stage in (1, 2, 3):
            shipped = DS_CONFIG_DIR / f"zero{stage}_bf16.json"
            for label in VARIANTS:
                path = variant_file(shipped, label, out_dir)
                results[f"zero{stage}_{label}"] = accumulate_and_read(str(path), env)
                if env.rank == 0:
                    print(f"zero{stage}_{label} read back", flush=True)
        dtypes = bf16_step_dtypes(env)
        if env.rank == 0:
            torch.save(results, out_dir / "grads.pt")
            (out_dir / "dtypes.json").write_text(json.dumps(dtypes, indent=1))
        tdist.barrier()
    finally:
        dist.shutdown()


if __name__ == "__main__":
    # Ends without the interpreter's teardown, which can abort a 2-rank run that finished well (clmae/cli.py).
    run_main(main, skip_teardown=True)

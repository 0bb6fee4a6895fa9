"""The DeepSpeed engines: one for the MAE, one for the curriculum masking module (SPEC section 6), or for
whatever module the masking strategy (clmae/masking.py) owns.

Each module gets its own AdamW, LR schedule and clipping, so neither optimiser ever holds state for,
or applies weight decay to, the other module (the reference's single optimiser with toggled
requires_grad leaks both). Both engines share the ZeRO / precision settings of one ds_configs file.

How the two steps go through the engines (what was proven equal to a single-process reference for
ZeRO 1, 2 and 3; see tests/test_ds_engines.py):
- MAE step: the masking module runs under no_grad through its plain module; the MAE runs through its
  engine; `mae_engine.backward` / `mae_engine.step`.
- CMM step: every MAE parameter is frozen (`requires_grad=False`), the MAE runs through its *plain
  module* (`mae_engine.module`), so no ZeRO gradient hook of the MAE engine fires; the masking module
  runs through its engine; `cmm_engine.backward` / `cmm_engine.step`; the MAE is unfrozen again.
  Forwarding through the MAE *engine* here hits DeepSpeed bugs (#4923: IndexError in ZeRO-2 gradient
  partitioning; "gradient computed twice" without freezing; wrong results under ZeRO-3).
"""

from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clmae.config import Config, ConfigError, OptimConfig
from clmae.masking import MaskingStrategy, build_strategy

# Package data (found in a non-editable install too); `ds_configs/` at the repository root links here.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"


def resolve_ds_config(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"train.ds_config: file not found: {path}")
        return path
    shipped = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"train.ds_config: no file '{name_or_path}' in {DS_CONFIG_DIR} (available: {names})")
    return shipped


def build_ds_config(cfg: Config, world_size: int, clip_grad: float, load_universal: bool = False) -> dict[str, Any]:
    """The ds_configs file, with the batch geometry and clipping taken from the run config.
    load_universal: the engine will load a universal checkpoint (a resume on another world size)."""
    path = resolve_ds_config(cfg.train.ds_config)
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON: {err}") from err
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer"):
        if key in ds_config:
            raise ConfigError(
                f"train.ds_config: {path} sets '{key}'; batch sizes and the optimiser come from the run "
                "config (data.batch_size, train.accum_steps, optim.*), remove it from the JSON file"
            )
    ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.train.accum_steps
    ds_config["train_batch_size"] = cfg.data.batch_size * cfg.train.accum_steps * world_size
    ds_config["gradient_clipping"] = clip_grad
    ds_config.setdefault("steps_per_print", 10**9)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def precision_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def param_groups(module: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: no decay on biases and 1-D parameters (norms), decay on the
    rest. That is timm 0.3.2's `add_weight_decay`, which MAE and the CL-MAE reference call with no skip list:
    their cls and mask tokens (3-D) ARE decayed, and their position embeddings are fixed (requires_grad=False,
    in no group). `no_decay_names` (`optim.no_decay_names`) exempts more parameters by their last name
    component, e.g. ("cls_token", "mask_token") as DeiT and later timm do."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_lr(opt: OptimConfig, global_batch: int) -> float:
    """MAE's linear scaling rule: lr = base_lr * global_batch / 256."""
    return opt.base_lr * global_batch / 256


class WarmupCosine:
    """LR multiplier per optimiser step: linear warmup, then half-cycle cosine down to min_lr.

    A callable object rather than a closure so that LambdaLR's state_dict carries its numbers. It is
    a pure function of the step (MAE's per-iteration schedule, `epoch + it / iters_per_epoch`), which
    makes a resumed run's learning rates identical to an uninterrupted run's.
    """

    def __init__(self, peak: float, min_lr: float, warmup_epochs: float, epochs: int, steps_per_epoch: float):
        self.peak = peak
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch

    def lr(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return self.peak * epoch / self.warmup_epochs
        progress = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(progress, 1.0)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak


@dataclass
class Engines:
    mae: Any  # deepspeed.DeepSpeedEngine
    masking: dict[str, Any]  # {strategy.module_name: its engine}; empty when the strategy owns no module
    strategy: MaskingStrategy
    dtype: torch.dtype
    global_batch: int
    ds_config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Every engine by name ("mae", then the masking strategy's): checkpoint directories, LRs, norms."""
        return {"mae": self.mae, **self.masking}

    @property
    def masking_module(self) -> nn.Module | None:
        """The masking strategy's module, plain (not its engine), or None."""
        return next((engine.module for engine in self.masking.values()), None)

    def lrs(self) -> dict[str, float]:
        return {f"lr/{name}": engine.get_lr()[0] for name, engine in self.as_dict().items()}


def _initialize(
    module: nn.Module, opt: OptimConfig, cfg: Config, world_size: int, steps_per_epoch: float, load_universal: bool
):
    import deepspeed

    ds_config = build_ds_config(cfg, world_size, clip_grad=opt.clip_grad, load_universal=load_universal)
    global_batch = ds_config["train_batch_size"]
    peak = peak_lr(opt, global_batch)
    # Fused AdamW is one kernel for all parameters on CUDA; the plain loop is what runs on CPU.
    fused = torch.cuda.is_available() and next(module.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        param_groups(module, opt.weight_decay, opt.no_decay_names), lr=peak, betas=tuple(opt.betas), fused=fused or None
    )
    schedule = WarmupCosine(peak, opt.min_lr, opt.warmup_epochs, cfg.train.epochs, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    use_foreach_grad_norm(engine.optimizer)
    return engine, ds_config


def use_foreach_grad_norm(optimizer: Any) -> bool:
    """Make a ZeRO optimizer take its gradient norm in one multi-tensor kernel instead of one per tensor.

    DeepSpeed's ZeRO 1-3 optimizers compute `get_grad_norm_direct` one gradient at a time: a cast and a norm per
    parameter tensor, about 500 of the 1,500 kernels of a ViT-B/16 MAE step (benchmarks/step_overhead.py), each
    a launch the GPU waits for. `torch._foreach_norm` takes all of them in one. Same value to rounding (the
    squares are summed in another order), same all-reduce over the data-parallel group, same -1 for a
    non-finite norm. Replaced on this instance only, and only where it is exact: an L2 norm without model or
    pipeline parallelism (clmae uses neither). Returns whether it was replaced.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) not in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        return False  # BF16_Optimizer (ZeRO-1 with bf16) takes its norm through another path
    if getattr(optimizer, "mpu", None) is not None or getattr(optimizer, "model_parallel_group", None) is not None:
        return False
    original = optimizer.get_grad_norm_direct
    stage3 = isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        import deepspeed.comm as ds_dist
        from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

        # DeepSpeed's own filter: the zero padding of the last partition is not a gradient.
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        replicated = any(getattr(p, "ds_pipe_replicated", False) for p in params)
        if float(norm_type) != 2.0 or not grads or replicated:
            return original(gradients, params, norm_type)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.stack(norms).square().sum()
        group = self._get_param_partition_group(params[0]) if stage3 else self.dp_process_group
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    optimizer.get_grad_norm_direct = types.MethodType(get_grad_norm_direct, optimizer)
    return True


def build_engines(
    cfg: Config,
    mae: nn.Module,
    module: nn.Module | None,
    steps_per_epoch: int,
    world_size: int,
    load_universal: bool = False,
) -> Engines:
    """Wrap the MAE and the masking strategy's module (`build_models`' second result, None if it owns none)
    each in its own DeepSpeed engine. `steps_per_epoch` counts optimiser steps; `load_universal`: the
    engines will load a re-sharded checkpoint (clmae.elastic). With train.compile the modules' blocks are
    compiled in place first (clmae.models.compile_blocks)."""
    strategy = build_strategy(cfg)
    if cfg.train.compile:
        from clmae.models import compile_blocks

        stage = json.loads(resolve_ds_config(cfg.train.ds_config).read_text()).get("zero_optimization", {})
        if stage.get("stage", 0) == 3:
            raise ConfigError(
                f"train.compile=true with train.ds_config={cfg.train.ds_config} (ZeRO-3): ZeRO-3 gathers each "
                "parameter in hooks inside the blocks, which torch.compile cannot trace; use ZeRO-1 or ZeRO-2"
            )
        for part in (mae, module):
            if part is not None:
                compile_blocks(part)
    mae_engine, ds_config = _initialize(mae, cfg.optim, cfg, world_size, steps_per_epoch, load_universal)
    masking = {}
    if module is not None:
        # The module steps on one iteration in masking.cmm_every: its schedule counts its own steps, so that
        # its learning rate follows the same line over the epochs as the MAE's.
        masking_steps_per_epoch = steps_per_epoch / cfg.masking.cmm_every
        masking[strategy.module_name], _ = _initialize(
            module, strategy.optim_config(), cfg, world_size, masking_steps_per_epoch, load_universal
        )
    return Engines(
        mae=mae_engine,
        masking=masking,
        strategy=strategy,
        dtype=precision_dtype(ds_config),
        global_batch=ds_config["train_batch_size"],
        ds_config=ds_config,
    )

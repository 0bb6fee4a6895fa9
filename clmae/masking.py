"""Masking strategies: how the MAE step's hard masks are chosen, and what else that takes.

A strategy (a `MaskingStrategy` subclass) says
- which module it owns, if any (`module_name`, `build_module`): none for `random`, the curriculum masking
  module (CMM) for `curriculum`. An owned module gets its own DeepSpeed engine and optimiser
  (`optim_config`), its own directory in every checkpoint and its own `clmae-export --what cmm` file, all
  named `module_name`;
- how the MAE step gets its hard masks (`scorer`): a callable from the MAE's position-embedded patch tokens
  (B, L, D) to keep scores (B, L), high = keep visible. The MAE keeps the top k = int(L * (1 - r)) of each
  image and calls the scorer under no_grad; None is MAE's own uniform noise;
- whether and how it takes its own optimisation step (`step`), after the MAE's, on the same micro-batches;
  `masking.cmm_every` and `masking.cmm_batch_fraction` make that step cheaper, for any strategy
  (`masking_step_due`, `masking_images`): one iteration in k, on the first images of each micro-batch;
- what it logs: `step` returns its metrics (named "<module_name>/<term>"), `report` adds to the console line.

`masking.mode` names the strategy: a registered name (`STRATEGIES`), or `package.module:ClassName` of a
subclass that every rank can import (a plugin, nothing to register: tests/masking_plugins.py has one).

Nothing heavy is imported at module level: the config validates `masking.mode` through `strategy_class`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from clmae.config import Config, ConfigError, OptimConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn


class MaskingStrategy:
    """Plain MAE by default: uniform random masks, no module of its own, no step of its own."""

    module_name: ClassVar[str | None] = None

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build_module(self, mae: nn.Module) -> nn.Module | None:
        """The module this strategy trains (None: it owns none). Built right after the MAE, same RNG stream."""
        return None

    def optim_config(self) -> OptimConfig:
        """The optimiser settings of the owned module's engine."""
        return self.cfg.optim

    def scorer(self, module: nn.Module | None) -> Callable[[Tensor], Tensor] | None:
        """Keep scores for the MAE step's hard masks; `module` is the owned module (plain, not its engine)."""
        return None

    def step(self, engines: Any, micro_batches: list[Tensor], lam: float) -> dict[str, Tensor]:
        """The strategy's own optimisation step after the MAE's; returns its metrics averaged over the
        micro-batches (detached). `engines`: clmae.ds_engines.Engines, the MAE already updated."""
        return {}

    def step_flops(self, mae: nn.Module, module: nn.Module | None, images: Tensor) -> float:
        """Training FLOPs of `step` on `images` (counted on meta tensors by clmae.masking.iteration_flops)."""
        return 0.0

    def report(self, report: dict[str, float]) -> list[str]:
        """Parts of the console's progress line, from a window's averaged metrics."""
        return []


class RandomMasking(MaskingStrategy):
    """Plain MAE (`masking.mode: random`): a fresh uniform random mask per image, exactly r hidden."""


class CurriculumMasking(MaskingStrategy):
    """CL-MAE (`masking.mode: curriculum`, SPEC sections 2-6): the CMM's top-k scores mask the MAE step; then
    the CMM learns from soft masks through the frozen MAE, weighted by the curriculum factor lambda."""

    module_name = "cmm"

    def build_module(self, mae: nn.Module) -> nn.Module:
        from clmae.models import CurriculumMaskingModule

        masking = self.cfg.masking
        return CurriculumMaskingModule(
            mae.num_patches, mae.embed_dim, depth=masking.cmm_depth, num_heads=masking.cmm_heads
        )

    def optim_config(self) -> OptimConfig:
        return self.cfg.cmm_optim_resolved()

    def scorer(self, module: nn.Module | None) -> Callable[[Tensor], Tensor] | None:
        return module

    def step(self, engines: Any, micro_batches: list[Tensor], lam: float) -> dict[str, Tensor]:
        from clmae.method import cmm_step

        engine = engines.masking[self.module_name]
        totals: dict[str, Tensor] = {}
        for images in micro_batches:
            # Soft masks through the frozen MAE's plain module, not its engine (see clmae/ds_engines.py).
            loss, metrics = cmm_step(engines.mae.module, engine, images, lam, self.cfg)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update at the last micro-batch only
            accumulate(totals, {f"cmm/{name}": value for name, value in metrics.items()}, len(micro_batches))
        return totals

    def step_flops(self, mae: nn.Module, module: nn.Module | None, images: Tensor) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        from clmae.method import cmm_step

        with FlopCounterMode(display=False) as counter:
            loss, _ = cmm_step(mae, module, images, 0.5, self.cfg)
            loss.backward()
        return float(counter.get_total_flops())

    def report(self, report: dict[str, float]) -> list[str]:
        return [f"cmm {report['cmm/loss_cmm']:.4f} (lambda {report['cmm/lambda']:+.2f})"]


def accumulate(totals: dict[str, Tensor], metrics: dict[str, Tensor], count: int) -> None:
    """totals[name] += metric / count, detached: the mean over `count` micro-batches, built up in place."""
    for name, value in metrics.items():
        totals[name] = totals.get(name, 0) + value.detach() / count


STRATEGIES: dict[str, type[MaskingStrategy]] = {
    "random": RandomMasking,
    "curriculum": CurriculumMasking,
}


def strategy_class(mode: str) -> type[MaskingStrategy]:
    """The strategy `masking.mode` names; ConfigError naming the registered ones if there is none."""
    if mode in STRATEGIES:
        return STRATEGIES[mode]
    registered = ", ".join(sorted(STRATEGIES))
    module_name, sep, class_name = mode.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(
            f"config key 'masking.mode': unknown masking strategy {mode!r}; registered: {registered}; "
            "or 'package.module:ClassName' of a clmae.masking.MaskingStrategy subclass"
        )
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config key 'masking.mode': cannot load {mode!r} ({err}); registered: {registered}") from err
    if not (isinstance(found, type) and issubclass(found, MaskingStrategy)):
        raise ConfigError(f"config key 'masking.mode': {mode!r} is not a clmae.masking.MaskingStrategy subclass")
    return found


def masking_step_due(cfg: Config, global_step: int) -> bool:
    """Whether the strategy takes its own step on iteration `global_step` (1-based): the first, then one in
    masking.cmm_every. A pure function of the step, so a resumed run steps on the same iterations."""
    return (global_step - 1) % cfg.masking.cmm_every == 0


def masking_batch_size(cfg: Config, batch: int) -> int:
    """How many images of a micro-batch of `batch` the strategy's step uses: masking.cmm_batch_fraction of them,
    rounded half up, at least one."""
    return max(1, min(batch, int(cfg.masking.cmm_batch_fraction * batch + 0.5)))


def masking_images(cfg: Config, images: Tensor) -> Tensor:
    """images (B, 3, H, W) -> the first masking_batch_size(cfg, B) of them: what the strategy's step trains on.
    The first, not a random draw: the crops are already random, and the choice needs no RNG."""
    count = masking_batch_size(cfg, len(images))
    return images if count == len(images) else images[:count]


def build_strategy(cfg: Config) -> MaskingStrategy:
    return strategy_class(cfg.masking.mode)(cfg)


def build_models(cfg: Config) -> tuple[nn.Module, nn.Module | None]:
    """The MAE (clmae.models.MaskedAutoencoderViT) and the module its masking strategy trains (`masking.mode`; the
    CMM for curriculum, None for random). Seed the RNG before calling."""
    from clmae.models import build_mae

    mae = build_mae(cfg.model.name, cfg.model.img_size, cfg.model.mask_ratio)
    return mae, build_strategy(cfg).build_module(mae)


def iteration_flops(cfg: Config) -> dict[str, float]:
    """Training FLOPs (forward + backward) per image of each step, averaged over iterations: {"mae": ..., "cmm": ...}.

    Counted, not estimated: the steps run once on a meta-device copy of the models, the same code as
    training, with no memory and no compute. The MAE step includes the scorer's no-grad forward; "cmm" is the
    masking strategy's own step (0 for plain MAE, masking.mode: random), times the share of a micro-batch it
    uses (masking.cmm_batch_fraction of data.batch_size) over masking.cmm_every: per image of the batch,
    per iteration. The optimiser's element-wise work is not included.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clmae.method import mae_step

    strategy = build_strategy(cfg)
    with torch.device("meta"):
        mae, module = build_models(cfg)
        size = mae.patch_embed.img_size
        images = torch.randn(1, 3, *size)
    with FlopCounterMode(display=False) as counter:
        loss, _ = mae_step(mae, strategy.scorer(module), images, cfg)
        loss.backward()
    batch = cfg.data.batch_size
    share = masking_batch_size(cfg, batch) / batch / cfg.masking.cmm_every
    return {"mae": float(counter.get_total_flops()), "cmm": strategy.step_flops(mae, module, images) * share}

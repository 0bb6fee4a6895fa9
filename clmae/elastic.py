"""Elastic resume: continue a run on another number of ranks than the checkpoint was written by (issue 15).

What changes with the world size W, and how each is carried over:

- The ZeRO shards. Each engine's state (fp32 master weights, Adam moments, step) is re-sharded by
  DeepSpeed's universal checkpoint: `ds_to_universal` rewrites the W shards as one file per parameter and
  state (`<step_dir>/universal/<engine>/`), and engines built with `"checkpoint": {"load_universal": true}`
  cut their own shards out of it, for ZeRO 1, 2 and 3. It is done once, by rank 0, and cached next to the
  checkpoint. (DeepSpeed's zero_to_fp32 consolidation would be simpler, but it keeps the weights only: the
  Adam moments would restart from zero.) Measured bitwise: parameters and both moments of a 2-rank
  checkpoint loaded on 1 rank equal the originals, for the three stages.
- The batch. The global batch G = data.batch_size x train.accum_steps x W stays what it was: the per-rank
  micro-batch b = data.batch_size is kept and the accumulation re-derived, K' = G / (b W'). When b W' does
  not divide G the resume is refused, naming the numbers and the world sizes that would work. Since the
  epoch order is made of chunks of b images (clmae.data, "Order"), every optimiser step then trains on the
  same micro-batches, whatever W: the learning-rate schedule, the curriculum and the masking module's
  per-micro-batch statistics (L_KL summed over a micro-batch, L_div over its pairs) mean the same thing,
  and only the order of the gradient reduction differs.
- The data position: step s of an epoch has consumed ids 0 .. s G - 1 of the epoch's permutation on any W,
  so the rest of the epoch is seen exactly once after the resume.
- The per-rank RNG streams (random masking's noise): a rank's saved stream has no counterpart on another
  W, so every rank re-seeds from (run.seed, rank, global step) instead.

An explicit change of the global batch (train.accum_steps other than the checkpoint's or the re-derived
one) stays refused unless `checkpoint.allow_global_batch_change: true`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from clmae import dist
from clmae.checkpoint import ENGINE_TAG, UNIVERSAL_SUBDIR, CheckpointError, ClientState
from clmae.config import Config, ConfigError

CONVERTED_MARKER = "CONVERTED"


@dataclass(frozen=True)
class ResumePlan:
    """How this launch continues a checkpoint."""

    accum_steps: int  # train.accum_steps for this launch
    global_batch: int
    saved_world_size: int
    world_size: int
    saved_global_batch: int

    @property
    def resharded(self) -> bool:
        return self.world_size != self.saved_world_size

    @property
    def batch_changed(self) -> bool:
        return self.global_batch != self.saved_global_batch

    def apply(self, cfg: Config) -> Config:
        """`cfg` with the accumulation this launch uses."""
        return replace(cfg, train=replace(cfg.train, accum_steps=self.accum_steps))


def plan_resume(saved: ClientState, cfg: Config, world_size: int, path: Path) -> ResumePlan:
    """The batch rule (module docstring); raises ConfigError naming the numbers when it cannot be kept."""
    batch, wanted = cfg.data.batch_size, cfg.train.accum_steps
    saved_accum = int(saved.config["train"]["accum_steps"])
    saved_global = batch * saved_accum * saved.world_size
    if world_size != saved.world_size and not cfg.checkpoint.allow_world_size_change:
        raise ConfigError(
            f"checkpoint {path} was written by {saved.world_size} ranks, this run has {world_size}, and "
            "checkpoint.allow_world_size_change=false: launch the same number of ranks or allow the change"
        )
    rederived, remainder = divmod(saved_global, batch * world_size)
    if remainder == 0 and wanted in (saved_accum, rederived):
        accum = rederived  # the same global batch: the config's own accum_steps, or one already adapted
    elif cfg.checkpoint.allow_global_batch_change:
        accum = wanted
    elif remainder:
        raise ConfigError(_no_exact_split(path, saved_global, batch, saved_accum, saved.world_size, world_size))
    else:
        raise ConfigError(
            f"checkpoint {path}: train.accum_steps={wanted} on {world_size} ranks changes the global batch from "
            f"{saved_global} (data.batch_size {batch} x train.accum_steps {saved_accum} x {saved.world_size} "
            f"ranks) to {batch * wanted * world_size}, which changes what the run learns; keep "
            f"train.accum_steps={rederived}, or set checkpoint.allow_global_batch_change=true (the learning "
            "rate then follows the new global batch: base_lr x global batch / 256)"
        )
    return ResumePlan(accum, batch * accum * world_size, saved.world_size, world_size, saved_global)


def _no_exact_split(path: Path, global_batch: int, batch: int, accum: int, saved_world: int, world: int) -> str:
    per_rank = global_batch // batch
    fits = [str(w) for w in range(1, per_rank + 1) if per_rank % w == 0]
    return (
        f"checkpoint {path}: its global batch {global_batch} (data.batch_size {batch} x train.accum_steps "
        f"{accum} x {saved_world} ranks) cannot be split over {world} ranks: {global_batch} / ({batch} x "
        f"{world}) is not a whole number of accumulation steps. Launch {', '.join(fits)} ranks, or set "
        "checkpoint.allow_global_batch_change=true with a train.accum_steps of your choice"
    )


def universal_dir(step_dir: Path, engine: str) -> Path:
    """Where the universal form of one engine's state is cached: `<step_dir>/universal/<engine>`."""
    return step_dir / UNIVERSAL_SUBDIR / engine


def convert_to_universal(step_dir: Path) -> None:
    """Make sure every engine of `step_dir` has its universal form (collective: rank 0 converts, once per
    checkpoint, the other ranks wait; a failure on rank 0 stops every rank with its message). Also works
    without a process group (one process converts)."""
    grouped = tdist.is_available() and tdist.is_initialized()
    failure = ""
    if not grouped or tdist.get_rank() == 0:
        try:
            for name in sorted(p.name for p in step_dir.iterdir() if (p / ENGINE_TAG).is_dir()):
                _convert_engine(step_dir, name)
        except Exception as err:  # every rank must hear of it, or the others wait for a collective forever
            failure = f"{type(err).__name__}: {err}"
            raise
        finally:
            if grouped:
                _share_outcome(failure)
    elif failure := _share_outcome(""):
        raise CheckpointError(f"{step_dir}: rank 0 could not convert it to a universal checkpoint ({failure})")


def _share_outcome(failure: str) -> str:
    message = [failure]
    tdist.broadcast_object_list(message, src=0)
    return message[0]


def _convert_engine(step_dir: Path, name: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target = universal_dir(step_dir, name)
    if (target / CONVERTED_MARKER).is_file():
        dist.log(f"re-sharding: using the universal checkpoint cached in {target}")
        return
    source = step_dir / name / ENGINE_TAG
    size = sum(f.stat().st_size for f in source.iterdir() if f.is_file())
    partial = target.with_name(f".{name}.partial")  # an interrupted conversion never looks finished
    for leftover in (partial, target):
        shutil.rmtree(leftover, ignore_errors=True)
    dist.log(
        f"re-sharding: converting the '{name}' engine's state ({size / 2**30:.2f} GiB) to DeepSpeed's universal "
        f"checkpoint in {target} (once; cached for later resumes)"
    )
    start = time.perf_counter()
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(source),
            output_folder=str(partial / ENGINE_TAG),
            num_extract_workers=1,  # in this process: forking a rank (CUDA, process group) is unsafe
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # clmae's modules carry no `universal_checkpoint_info` (it only matters for tensor/pipeline
            # parallelism); DeepSpeed then asks for this to write its default.
            inject_missing_state=True,
        )
    )
    (partial / CONVERTED_MARKER).write_text(f"from {source} in {time.perf_counter() - start:.1f} s\n")
    os.replace(partial, target)
    dist.log(f"re-sharding: '{name}' converted in {time.perf_counter() - start:.1f} s")


def reseed_rank_streams(seed: int, rank: int, global_step: int) -> None:
    """Seed this rank's torch, CUDA, numpy and Python generators from (seed, rank, global step): the
    streams of a re-sharded run, deterministic for its new world size."""
    words = np.random.SeedSequence([seed, rank, global_step]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(words[0]))  # also every CUDA device
    np.random.seed(int(words[1] % 2**32))
    random.seed(int(words[1]))


def step_in_new_batch(plan: ResumePlan, step_in_epoch: int, path: Path) -> int:
    """The step of the epoch to continue at once the global batch changed: the same images consumed, in
    whole new global batches (else refused: resume from an epoch-end checkpoint instead)."""
    consumed = step_in_epoch * plan.saved_global_batch
    step, remainder = divmod(consumed, plan.global_batch)
    if remainder:
        raise ConfigError(
            f"checkpoint {path}: {consumed} images of its epoch are done ({step_in_epoch} steps of "
            f"{plan.saved_global_batch}), not a whole number of the new global batch {plan.global_batch}; "
            "resume from a checkpoint at an epoch end to change the global batch"
        )
    return step


def restart_schedules(engines: dict, position: int) -> None:
    """Put each engine's LR schedule (built for the new global batch: peak lr = base_lr x G / 256, and
    steps per epoch) at optimiser step `position` of it, and set the lr there."""
    for engine in engines.values():
        scheduler = engine.lr_scheduler
        scheduler.last_epoch = position
        lrs = [base * fn(position) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports


def describe(plan: ResumePlan, saved_accum: int, global_step: int, epoch: int) -> str:
    """The log line (and MLflow tag) of a resume that re-sharded the run or changed its global batch."""
    if plan.resharded:
        what = f"re-sharded from {plan.saved_world_size} to {plan.world_size} ranks"
    else:
        what = f"resumed on the same {plan.world_size} ranks"
    what += f" at global step {global_step} (epoch {epoch}): train.accum_steps {saved_accum} -> {plan.accum_steps}, "
    if plan.batch_changed:
        return what + f"global batch CHANGED {plan.saved_global_batch} -> {plan.global_batch} (lr follows it)"
    return what + f"global batch {plan.global_batch} kept"


def prepare(saved: ClientState, cfg: Config, world_size: int, path: Path) -> ResumePlan:
    """Everything a resume of `path` needs before the engines exist: the batch rule, the data position
    check of a global-batch change, and (on a new world size) the universal conversion. Collective."""
    plan = plan_resume(saved, cfg, world_size, path)
    if plan.batch_changed:
        step_in_new_batch(plan, saved.step_in_epoch, path)  # refuses early, before any conversion
    if plan.resharded:
        convert_to_universal(path)
    return plan


def after_load(plan: ResumePlan, engines: dict, seed: int, rank: int, restored: ClientState, steps_per_epoch: int):
    """What follows the engines' load: the new world size's RNG streams and, for a new global batch, the
    LR schedules at the same images. Returns (epoch, step in epoch) to continue at."""
    if plan.resharded:
        reseed_rank_streams(seed, rank, restored.global_step)
        for engine in engines.values():
            _fix_adam_step(engine)
    step = restored.step_in_epoch
    if plan.batch_changed:
        step = step_in_new_batch(plan, step, Path("."))
        restart_schedules(engines, restored.epoch * steps_per_epoch + step)
    return restored.epoch, step


def announce(plan: ResumePlan, saved_accum: int, global_step: int, epoch: int, tracker) -> None:
    """Log a re-sharding (or a global-batch change) and tag it on the run's MLflow run."""
    if not (plan.resharded or plan.batch_changed):
        return
    change = describe(plan, saved_accum, global_step, epoch)
    dist.log(change)
    tracker.set_tags({f"resharded.step_{global_step:09d}": change, "world_size": str(plan.world_size)})


def _fix_adam_step(engine) -> None:
    """Set AdamW's step (its bias correction) to the optimiser steps the engine has taken. DeepSpeed 0.19's
    ZeRO-3 universal load restores a wrong one (measured: 4 instead of 2 from a 2-rank checkpoint at step
    2), which changes every update after the resume; stages 1 and 2 restore it right, and stay unchanged."""
    taken = engine.global_steps - engine.skipped_steps
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(taken)
            else:
                state["step"] = taken

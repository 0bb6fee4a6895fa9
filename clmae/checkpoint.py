"""Checkpoints: every engine's ZeRO-sharded state under one step tag, plus the run's client state.

Layout of a run directory:

    <run_dir>/checkpoints/
        step_000001200/
            mae/state/...        DeepSpeed files of the MAE engine (one shard per rank)
            cmm/state/...        DeepSpeed files of the masking strategy's module (clmae/masking.py), if any
            rng/rank_00000.pt    RNG states of every rank (torch, CUDA, numpy, python)
            universal/mae/...    only once a run resumed it on another number of ranks: the engines'
                                 states re-sharded by DeepSpeed's universal checkpoint (clmae.elastic)
            client_state.json    epoch, step, global step, curriculum, loader position, MLflow run id, config
            COMPLETE             written last: a directory without it is an interrupted save
        latest                   name of the newest complete step directory, replaced atomically

A crash or `kill -9` during a save leaves a directory without COMPLETE and an unchanged `latest`, so
`resume: auto` always finds a whole checkpoint. `save` and `load` are collective: every rank calls them
(they wait for each other). The other functions only read (or, `prune`, delete) files on the calling rank.
Reading weights out of a checkpoint, for export and evaluation, is clmae/weights.py's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from clmae import faults
from clmae.config import Config, ConfigError, flatten
from clmae.errors import ClmaeError
from clmae.files import write_atomic

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
ENGINE_TAG = "state"
UNIVERSAL_SUBDIR = "universal"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{9})$")

# Keys a resumed run may change: where things are and how they are reported, not what is computed.
RESUME_MUTABLE_PREFIXES = (
    "run.output_dir",
    "run.name",
    "dist.",
    "data.train_path",
    "data.val_path",
    "data.num_workers",
    "data.os_cache",
    "train.log_every",
    "train.peak_tflops",
    "train.stop_at_step",
    "train.accum_steps",  # re-derived for the world size by clmae.elastic.plan_resume, which keeps the global batch
    "checkpoint.",
    "tracking.",
)


class CheckpointError(ClmaeError, RuntimeError):
    """A checkpoint is missing, incomplete or does not belong to this run's config."""


@dataclass
class ClientState:
    epoch: int  # epoch in progress
    step_in_epoch: int  # optimiser steps already done in that epoch
    global_step: int  # optimiser steps done in total
    world_size: int
    mlflow_run_id: str | None
    config: dict[str, Any]
    curriculum_lambda: float | None = None  # for humans reading the file; recomputed on resume

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def step_dir_name(global_step: int) -> str:
    return f"step_{global_step:09d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "client_state.json").is_file()


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states, as plain tensors and lists so that `weights_only=True` can load them."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | os.PathLike, engines: dict[str, Any], client_state: ClientState, keep_last: int) -> Path:
    """Write a complete checkpoint for `client_state.global_step`, point `latest` at it, prune old ones.

    engines: {"mae": DeepSpeedEngine, "cmm": DeepSpeedEngine}; the masking module's engine is absent
    for plain MAE runs.
    """
    root = checkpoint_root(run_dir)
    path = root / step_dir_name(client_state.global_step)
    rank = _rank()
    if rank == 0:
        if path.exists():  # an interrupted save of the same step: start it again from nothing
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    for name, engine in engines.items():
        # save_latest: each engine directory gets DeepSpeed's own `latest` (naming ENGINE_TAG), so that the
        # zero_to_fp32.py DeepSpeed copies into it opens it without `--tag`; our resume never reads that file.
        engine.save_checkpoint(str(path / name), tag=ENGINE_TAG, save_latest=True)
    (path / "rng").mkdir(exist_ok=True)
    torch.save(capture_rng_state(), path / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0 and faults.armed("kill_in_save", client_state.global_step):
        faults.kill_self()
    _barrier()  # every rank's shards and RNG file are on disk
    if rank == 0:
        write_atomic(path / "client_state.json", client_state.to_json())
        write_atomic(path / COMPLETE_MARKER, "")
        write_atomic(root / LATEST_FILE, path.name + "\n")
        prune(root, keep_last)
    _barrier()
    return path


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop interrupted saves older than the newest."""
    steps = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR_PATTERN.match(p.name))
    complete = [p for p in steps if is_complete(p)]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for path in steps:
        if path in keep or (newest is not None and path.name > newest.name):
            continue  # a newer directory may be a save in progress on a rank that is still writing
        shutil.rmtree(path, ignore_errors=True)


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run: `latest` if it is whole, else the newest whole step dir."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    latest = root / LATEST_FILE
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.iterdir() if STEP_DIR_PATTERN.match(p.name) and is_complete(p))
    return complete[-1] if complete else None


def resolve_resume(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, per `checkpoint.resume` (auto | none | a path)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return find_latest(run_dir)
    path = Path(mode).expanduser()
    if path.is_dir() and (path / CHECKPOINT_SUBDIR).is_dir():
        found = find_latest(path)  # a run directory
        if found is None:
            raise CheckpointError(f"checkpoint.resume={mode}: the run directory has no complete checkpoint")
        return found
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={mode}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume={mode}: incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def read_client_state(path: Path) -> ClientState:
    return ClientState(**json.loads((path / "client_state.json").read_text()))


def check_compatible(saved: ClientState, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint that belongs to a different model or recipe: resuming it would silently
    train something else. Keys in RESUME_MUTABLE_PREFIXES may change; the world size and the global
    batch are clmae.elastic.plan_resume's to judge."""
    saved_flat = flatten(saved.config)
    current = cfg.flat()
    differing = [
        f"{key}: checkpoint {saved_flat.get(key)!r} != now {current.get(key)!r}"
        for key in sorted(set(saved_flat) | set(current))
        if not key.startswith(RESUME_MUTABLE_PREFIXES)
        and _normalise(saved_flat.get(key)) != _normalise(current.get(key))
    ]
    if differing:
        raise ConfigError(
            f"checkpoint {path} was written with a different config; refusing to resume "
            f"({'; '.join(differing)}). Start a new run (run.name=...) or set checkpoint.resume=none"
        )


def _normalise(value: Any) -> Any:
    # JSON has no tuples: (0.9, 0.95) comes back as [0.9, 0.95].
    return list(value) if isinstance(value, tuple) else value


def load(
    path: Path,
    engines: dict[str, Any],
    load_optimizer: bool = True,
    resharded: bool = False,
    load_schedules: bool = True,
) -> ClientState:
    """Restore both engines (weights, optimiser, LR schedule) and this rank's RNG state.

    resharded: the checkpoint was written by another number of ranks; the engines (built with
    `load_universal`) load its universal form (clmae.elastic.convert_to_universal) and the RNG states,
    which belong to the old ranks, are left to clmae.elastic.reseed_rank_streams.
    load_schedules: False keeps the LR schedules as built (a new global batch: clmae.elastic)."""
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(
            str(path / UNIVERSAL_SUBDIR / name if resharded else path / name),
            tag=ENGINE_TAG,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer and load_schedules,
        )
        if load_path is None:
            raise CheckpointError(f"{path / name}: DeepSpeed found no engine state to load")
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file() and not resharded:
        restore_rng_state(torch.load(rng_file, weights_only=True))
    return read_client_state(path)

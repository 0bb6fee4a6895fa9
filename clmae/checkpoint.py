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
            MANIFEST.json        every file above with its size and SHA-256, hashed by the rank that wrote it
            COMPLETE             written last (holds the manifest's own SHA-256): without it, an interrupted save
        latest                   name of the newest complete step directory, replaced atomically
        damaged_step_.../       a checkpoint that failed its manifest on resume, kept for inspection

A crash or `kill -9` during a save leaves a directory without COMPLETE and an unchanged `latest`, so
`resume: auto` always finds a whole checkpoint; a save that fails (disk full, permission, I/O error) is
agreed on by every rank, removed, and reported with its path and cause, leaving `latest` and the older
checkpoints as they were. A checkpoint altered after its save (a truncated or changed shard on a shared
filesystem) fails `verify_checkpoint`: resume then falls back to the previous complete checkpoint, and
clmae-export / clmae-eval refuse it, naming the file. `save` and `load` are
collective: every rank calls them (they wait for each other); so is `verify_checkpoint` when a process group is up.
The other functions only read (or, `prune`, delete) files on the calling rank. Reading weights out of a
checkpoint, for export and evaluation, is clmae/weights.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from clmae import faults
from clmae.config import Config, ConfigError, flatten, upgrade_saved
from clmae.errors import ClmaeError
from clmae.files import write_atomic

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
MANIFEST_FILE = "MANIFEST.json"
DAMAGED_PREFIX = "damaged_"
# SHA-256: with the SHA extensions of current x86 and ARM CPUs, hashlib runs it at ~1.7 GB/s per core,
# twice BLAKE2b's speed (measured in README, "Checkpoint verification"), and it is the hash everyone can
# check with `sha256sum`.
HASH_ALGORITHM = "sha256"
VERIFY_MODES = ("full", "size", "none")
ENGINE_TAG = "state"
UNIVERSAL_SUBDIR = "universal"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{9})$")

# Keys a resumed run may change: where things are and how they are reported, not what is computed.
RESUME_MUTABLE_PREFIXES = (
    "run.output_dir",
    "run.name",
    "run.lock_timeout_seconds",
    "dist.",
    "data.train_path",
    "data.val_path",
    "data.num_workers",
    "data.os_cache",
    "train.log_every",
    "train.peak_tflops",
    "train.stop_at_step",
    "train.on_nonfinite",
    "train.max_rollbacks",
    "train.rollback_skip_margin",
    "train.skip_steps",  # merged with the checkpoint's own record (ClientState.skip_steps)
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
    curriculum_lambda: float | None = None  # of the last step trained; for humans reading the file
    skip_steps: list[int] = field(default_factory=list)  # global steps not trained on (train.skip_steps + rollbacks)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # {"step", "terms", "from_step", "skipped"}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def run_dir_of(step_dir: str | os.PathLike) -> Path:
    """The run directory a step directory belongs to (the inverse of checkpoint_root / step_dir_name)."""
    return Path(step_dir).parent.parent


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
    for plain MAE runs. A write that fails on any rank fails the save on every rank (CheckpointSaveError,
    naming the path and the cause) with `latest` and the older checkpoints untouched.
    """
    root = checkpoint_root(run_dir)
    path = root / step_dir_name(client_state.global_step)
    rank = _rank()
    faults.in_save(rank, client_state.global_step, "begin")

    def prepare() -> None:
        if path.exists():  # an interrupted save of the same step: start it again from nothing
            shutil.rmtree(path)
        for name in engines:  # made here, so that a failure to create them is agreed on like any other
            (path / name / ENGINE_TAG).mkdir(parents=True)
        (path / "rng").mkdir()

    _agree_on_save(path, _attempt(prepare, path) if rank == 0 else None)
    for name, engine in engines.items():
        target = path / name
        # save_latest: each engine directory gets DeepSpeed's own `latest` (naming ENGINE_TAG), so that the
        # zero_to_fp32.py DeepSpeed copies into it opens it without `--tag`; our resume never reads that file.
        error = _attempt(partial(engine.save_checkpoint, str(target), tag=ENGINE_TAG, save_latest=True), target)
        if error is not None:
            # A failed torch.save skips the barrier that ends DeepSpeed's save_checkpoint on this rank only.
            _barrier()
        _agree_on_save(path, error)

    def write_rank_files() -> None:
        torch.save(capture_rng_state(), path / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            write_atomic(path / "client_state.json", client_state.to_json())

    _agree_on_save(path, _attempt(write_rank_files, path))
    faults.in_save(rank, client_state.global_step, "written")
    # Every rank hashes the files it wrote (still in its page cache), in parallel across ranks.
    hashed: dict[str, list] = {}
    error = _attempt(lambda: hashed.update(_hash_own_files(path)), path)
    _agree_on_save(path, error)
    reports = _all_gather(hashed)
    _agree_on_save(path, _attempt(lambda: _commit(path, reports, keep_last), path) if rank == 0 else None)
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


# --------------------------------------------------------------------------------------------------
# Integrity: a manifest written with every checkpoint, failures agreed on by every rank
# --------------------------------------------------------------------------------------------------


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permission, I/O error); nothing of it was kept."""


class CheckpointIntegrityError(CheckpointError):
    """A complete checkpoint's files differ from its manifest: truncated, altered or missing."""


@dataclass
class VerifyReport:
    files: int
    bytes: int
    seconds: float
    verified: bool  # False: written before manifests existed (or checkpoint.verify=none), not checked


# A file's writer, from DeepSpeed's and our names: zero_pp_rank_<r>_... (ZeRO shards), rng/rank_<r>.pt.
_OWNER_PATTERN = re.compile(r"zero_pp_rank_(\d+)_|^rng/rank_(\d+)\.pt$")


def _world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _all_gather(value: Any) -> list[Any]:
    if _world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * _world_size()
    tdist.all_gather_object(gathered, value)
    return gathered


def _broadcast(value: Any) -> Any:
    if _world_size() == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _attempt(action: Any, where: Path) -> str | None:
    """Run `action`; None when it worked, else what failed and why, with the free space left."""
    try:
        action()
        return None
    except (OSError, RuntimeError) as err:
        if isinstance(err, OSError):
            cause = str(err) if err.filename else f"{where}: {err}"
        else:  # torch.save's writer reports a failed write without its errno: say what could have caused it
            cause = f"{where}: writing failed ({type(err).__name__}: {str(err).strip()[:200]})"
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            cause += f"; file size limit (ulimit -f) {limit:,} bytes"
        probe = next((p for p in (where, *where.parents) if p.exists()), None)
        if probe is not None:
            cause += f"; {shutil.disk_usage(probe).free / 2**20:,.1f} MiB free on that filesystem"
        return f"rank {_rank()}: {cause}"


def _agree_on_save(path: Path, error: str | None) -> None:
    """Every rank learns whether any rank failed; then all raise, and the partial save is removed."""
    errors = [e for e in _all_gather(error) if e is not None]
    if not errors:
        return
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # frees the space a full disk needs back
    _barrier()
    latest = find_latest(run_dir_of(path))
    kept = f"`latest` is still {latest.name}" if latest is not None else "there is no earlier checkpoint"
    raise CheckpointSaveError(f"checkpoint {path} could not be saved and was removed ({kept}): {'; '.join(errors)}")


def _checkpoint_files(step_dir: Path) -> list[str]:
    """Every file of a step directory (relative, sorted), except the manifest, the marker and temp files."""
    names = []
    for file in step_dir.rglob("*"):
        rel = file.relative_to(step_dir).as_posix()
        if file.is_file() and rel not in (MANIFEST_FILE, COMPLETE_MARKER) and not file.name.startswith("."):
            names.append(rel)
    return sorted(names)


def _owner(rel: str, world_size: int) -> int:
    match = _OWNER_PATTERN.search(rel)
    return int(match.group(1) or match.group(2)) % world_size if match else 0


def _hash_threads() -> int:
    # The ranks of a node hash at the same time: share its cores between them.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(local_ranks, 1)))


def _digest(path: Path) -> tuple[int, str]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return size, hashlib.file_digest(handle, HASH_ALGORITHM).hexdigest()


def _hash_many(step_dir: Path, names: list[str]) -> dict[str, list]:
    """{name: [size, hex digest]}, hashed on a few threads (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
        digests = pool.map(lambda name: _digest(step_dir / name), names)
        return {name: list(value) for name, value in zip(names, digests, strict=True)}


def _hash_own_files(step_dir: Path) -> dict[str, list]:
    """The files this rank wrote (it sees them without waiting for another node's directory cache)."""
    world, rank = _world_size(), _rank()
    return _hash_many(step_dir, [n for n in _checkpoint_files(step_dir) if _owner(n, world) == rank])


def _commit(path: Path, reports: list[dict[str, list]], keep_last: int) -> None:
    """Rank 0: manifest, then COMPLETE (holding the manifest's hash), then `latest`, then prune."""
    files: dict[str, list] = {}
    for report in reports:
        files.update(report)
    unreported = [n for n in _checkpoint_files(path) if n not in files]  # e.g. a file named like no rank's
    files.update(_hash_many(path, unreported))
    manifest = {
        "algorithm": HASH_ALGORITHM,
        "files": {name: {"size": size, HASH_ALGORITHM: digest} for name, (size, digest) in sorted(files.items())},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    write_atomic(path / MANIFEST_FILE, text)
    write_atomic(path / COMPLETE_MARKER, f"{MANIFEST_FILE} {HASH_ALGORITHM} {_text_digest(text)}\n")
    write_atomic(path.parent / LATEST_FILE, path.name + "\n")
    prune(path.parent, keep_last)


def _text_digest(text: str) -> str:
    return hashlib.new(HASH_ALGORITHM, text.encode()).hexdigest()


def _read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The manifest, checked against the hash that COMPLETE holds; None for a checkpoint written before
    manifests (an empty COMPLETE)."""
    marker = (step_dir / COMPLETE_MARKER).read_text().split()
    if not marker:
        return None
    manifest_file = step_dir / MANIFEST_FILE
    if len(marker) != 3 or marker[0] != MANIFEST_FILE:
        raise CheckpointIntegrityError(f"{step_dir / COMPLETE_MARKER}: not a clmae COMPLETE marker")
    if not manifest_file.is_file():
        raise CheckpointIntegrityError(f"{manifest_file}: missing (COMPLETE says the checkpoint has one)")
    text = manifest_file.read_text()
    if hashlib.new(marker[1], text.encode()).hexdigest() != marker[2]:
        raise CheckpointIntegrityError(f"{manifest_file}: altered (its {marker[1]} differs from COMPLETE's)")
    return json.loads(text)


def _check_file(step_dir: Path, name: str, expected: dict[str, Any], algorithm: str, mode: str) -> str | None:
    path = step_dir / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or rewritten)"
    if mode == "full":
        with open(path, "rb") as handle:
            if hashlib.file_digest(handle, algorithm).hexdigest() != expected[algorithm]:
                return f"{path}: content altered ({algorithm} differs from the manifest's)"
    return None


def verify_checkpoint(step_dir: str | os.PathLike, mode: str = "full") -> VerifyReport:
    """Check a complete checkpoint against its manifest; raise CheckpointIntegrityError naming the file.

    mode: full (sizes and SHA-256 of every file) | size (sizes only: catches truncation, not bit flips) |
    none. The one check behind resume, clmae-export and clmae-eval. Collective when a process group is
    up: each rank hashes a share of the files (balanced by size), and every rank gets the same verdict.
    """
    step_dir = Path(step_dir)
    if mode not in VERIFY_MODES:
        raise ConfigError(f"config key 'checkpoint.verify': {mode!r} must be one of {', '.join(VERIFY_MODES)}")
    start = time.perf_counter()
    problem, manifest = None, None
    if mode != "none":
        try:
            manifest = _read_manifest(step_dir)
        except (CheckpointIntegrityError, OSError, ValueError) as err:
            problem = str(err) if isinstance(err, CheckpointIntegrityError) else f"{step_dir / MANIFEST_FILE}: {err}"
    files = sorted((manifest or {}).get("files", {}).items(), key=lambda item: -item[1]["size"])
    loads = [0] * _world_size()
    mine = []
    for name, expected in files:  # largest first, each to the least loaded rank
        target = loads.index(min(loads))
        loads[target] += expected["size"]
        if target == _rank():
            mine.append((name, expected))
    if problem is None and mine:
        algorithm = manifest["algorithm"]
        with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
            found = pool.map(lambda item: _check_file(step_dir, *item, algorithm, mode), mine)
            problem = next((p for p in found if p is not None), None)
    problems = [p for p in _all_gather(problem) if p is not None]
    if problems:
        raise CheckpointIntegrityError(f"{problems[0]} (checkpoint {step_dir} fails its {MANIFEST_FILE})")
    total = sum(expected["size"] for _, expected in files)
    return VerifyReport(len(files), total, time.perf_counter() - start, manifest is not None)


def newest_verified(run_dir: str | os.PathLike, mode: str, set_aside: bool) -> Path | None:
    """The newest complete checkpoint of a run that passes verify_checkpoint; one that fails is reported,
    skipped and, with set_aside (the run's own directory, under its lock), renamed damaged_step_... so
    that neither `latest` nor pruning counts it again. Collective; rank 0 picks the candidates."""
    from clmae import dist

    skipped: set[str] = set()
    while True:
        candidate = _broadcast(_newest_complete(Path(run_dir), skipped) if _rank() == 0 else None)
        if candidate is None:
            return None
        try:
            report = verify_checkpoint(candidate, mode)
        except CheckpointIntegrityError as err:
            skipped.add(candidate.name)
            aside = candidate.with_name(f"{DAMAGED_PREFIX}{candidate.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            if set_aside and _rank() == 0:
                candidate.rename(aside)
            _barrier()
            kept = f"; kept as {aside.name}" if set_aside else ""
            dist.log(f"warning: {err}; falling back to the previous complete checkpoint{kept}")
            continue
        if report.verified:
            dist.log(
                f"verified {candidate} ({report.files} files, {report.bytes / 2**30:.2f} GiB, {mode}) "
                f"in {report.seconds:.1f} s"
            )
        return candidate


def _newest_complete(run_dir: Path, skipped: set[str]) -> Path | None:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    order = []
    latest = root / LATEST_FILE
    if latest.is_file():
        order.append(root / latest.read_text().strip())
    order += sorted((p for p in root.iterdir() if STEP_DIR_PATTERN.match(p.name)), reverse=True)
    return next((p for p in order if p.name not in skipped and is_complete(p)), None)


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
        return newest_verified(run_dir, cfg.checkpoint.verify, set_aside=True)
    path = Path(mode).expanduser()
    if path.is_dir() and (path / CHECKPOINT_SUBDIR).is_dir():
        found = newest_verified(path, cfg.checkpoint.verify, set_aside=False)  # a run directory
        if found is None:
            raise CheckpointError(f"checkpoint.resume={mode}: the run directory has no complete checkpoint")
        return found
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={mode}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume={mode}: incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    verify_checkpoint(path, cfg.checkpoint.verify)
    return path


def read_client_state(path: Path) -> ClientState:
    return ClientState(**json.loads((path / "client_state.json").read_text()))


def check_compatible(saved: ClientState, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint that belongs to a different model or recipe: resuming it would silently
    train something else. Keys in RESUME_MUTABLE_PREFIXES may change; the world size and the global
    batch are clmae.elastic.plan_resume's to judge."""
    saved_flat = flatten(upgrade_saved(saved.config))
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
        # DeepSpeed reads the format from the engine's config when it loads, and a run resumed re-sharded
        # may roll back (clmae.train.roll_back) to a checkpoint it wrote itself, in its native format.
        engine._config.load_universal_checkpoint = resharded
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

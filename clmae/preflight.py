"""Bad input stops a launch in seconds, with one line naming the key or path: before any process group,
model or engine exists (issue 18, section 4).

`check_pretrain(cfg)` is what `clmae-pretrain` runs right after reading its config; the single checks are
used by the other console scripts for the paths they take. Every failure is a ClmaeError (exit code 2).
What one key alone can get wrong (types, ranges) is config.py's; here are the checks that need two keys, the
model's geometry, or a look inside a file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

from clmae.config import Config, ConfigError
from clmae.errors import ClmaeError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class InputError(ClmaeError, ValueError):
    """A path the user gave exists but is not what it should be."""


def check_pretrain(cfg: Config) -> None:
    from clmae.masking import strategy_class

    strategy_class(cfg.masking.mode)  # names masking.mode if no strategy (or plugin) of that name loads
    check_model_geometry(cfg)
    check_schedule(cfg)
    check_run_dir(cfg)
    check_data_file(cfg.data.train_path, "data.train_path")
    if cfg.tracking.mask_images_every_epochs:
        check_data_file(cfg.data.val_path, "data.val_path")
    if cfg.checkpoint.init_from:
        check_weights(cfg.checkpoint.init_from, "checkpoint.init_from")
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).expanduser().is_dir():
        raise InputError(
            f"checkpoint.resume: {cfg.checkpoint.resume} is not a directory (expected auto, none, a run directory "
            "or one of its checkpoints/step_* directories)"
        )
    from clmae.ds_engines import build_ds_config

    build_ds_config(cfg, 1, cfg.optim.clip_grad)  # names train.ds_config if it is missing or not JSON


def check_model_geometry(cfg: Config) -> None:
    """The image must tile into patches, the mask must leave at least one patch visible and hide at least
    one, and the masking module's heads must divide its width."""
    from clmae.specs import VIT_SPECS, model_image_size

    spec = VIT_SPECS[cfg.model.name]
    size = model_image_size(cfg.model)
    if size % spec.patch_size:
        raise ConfigError(
            f"config key 'model.img_size': {size} is not a multiple of {cfg.model.name}'s patch size "
            f"{spec.patch_size}"
        )
    patches = (size // spec.patch_size) ** 2
    visible = int(patches * (1 - cfg.model.mask_ratio))
    if not 1 <= visible < patches:
        raise ConfigError(
            f"config key 'model.mask_ratio': {cfg.model.mask_ratio} leaves {visible} of {patches} patches visible "
            f"({cfg.model.name} at {size} px); at least 1 must be visible and 1 hidden"
        )
    if cfg.masking.mode == "curriculum" and spec.embed_dim % cfg.masking.cmm_heads:
        raise ConfigError(
            f"config key 'masking.cmm_heads': {cfg.masking.cmm_heads} does not divide the masking module's width "
            f"{spec.embed_dim} ({cfg.model.name})"
        )


def check_schedule(cfg: Config) -> None:
    for section, optim in (("optim", cfg.optim), ("cmm_optim", cfg.cmm_optim_resolved())):
        if optim.warmup_epochs > cfg.train.epochs:
            # Legal (MAE's schedule allows it, and short test runs of a long recipe do it), but rarely meant.
            print(
                f"warning: config key '{section}.warmup_epochs': {optim.warmup_epochs:g} is longer than "
                f"train.epochs={cfg.train.epochs}: the learning rate never reaches its peak",
                file=sys.stderr,
            )
        if optim.min_lr > optim.base_lr:
            raise ConfigError(
                f"config key '{section}.min_lr': {optim.min_lr:g} is above {section}.base_lr={optim.base_lr:g}"
            )


def check_run_dir(cfg: Config) -> None:
    output_dir = Path(cfg.run.output_dir).expanduser()
    for key, path in (("run.output_dir", output_dir), ("run.name", output_dir / cfg.run.name)):
        if path.exists() and not path.is_dir():
            raise InputError(f"{key}: {path} exists and is not a directory")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ConfigError(f"config key 'run.name': {cfg.run.name!r} must be one directory name (no '/')")


def check_data_file(path: str | os.PathLike, key: str) -> None:
    """An (image, label) FFCV file as clmae-prep writes it, whole (data_prep.verify.BetonFile's checks:
    header, fields, metadata, allocation table), with at least one image."""
    from data_prep import DataPrepError
    from data_prep.verify import BetonFile

    file = Path(path).expanduser()
    if not file.exists():
        hint = "write it with `clmae-prep` (e.g. `clmae-prep digits data/digits`)"
        raise FileNotFoundError(f"{key}: {file} does not exist; {hint}")
    if not file.is_file():
        raise InputError(f"{key}: {file} is not a file (expected an FFCV .beton written by clmae-prep)")
    if file.stat().st_size == 0:
        raise InputError(f"{key}: {file} is empty (expected an FFCV .beton written by clmae-prep)")
    try:
        beton = BetonFile(file)
    except DataPrepError as err:
        raise InputError(f"{key}: {err}") from None
    if beton.num_samples < 1:
        raise InputError(f"{key}: {file} holds no images")


def check_weights(path: str | os.PathLike, key: str) -> None:
    """A weights file (`.safetensors`, `.pth`, `.pt`) whose container is whole, or a clmae checkpoint
    directory; the tensors themselves are checked against the model when they are loaded."""
    from clmae.checkpoint import find_latest, is_complete, verify_checkpoint

    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{key}: {file} does not exist")
    if file.is_dir():
        step_dir = file if is_complete(file) else find_latest(file)
        if step_dir is None:
            raise InputError(f"{key}: {file} is a directory with no complete clmae checkpoint")
        verify_checkpoint(step_dir)  # the checkpoint it names must be whole (names the damaged file)
        return
    if file.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"{key}: {file} is not a weights file (expected {', '.join(WEIGHT_SUFFIXES)})")
    reason = _safetensors_problem(file) if file.suffix == ".safetensors" else _torch_file_problem(file)
    if reason is not None:
        raise InputError(f"{key}: {file} is not a valid {file.suffix} weights file ({reason})")


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header claims {length} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: its tensors need {8 + length + max(ends)} bytes, the file has {size}"
    return None


def _torch_file_problem(file: Path) -> str | None:
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"damaged archive: {err}"
        return f"damaged archive member {bad}" if bad else None
    with open(file, "rb") as handle:
        head = handle.read(2)
    if len(head) < 2 or head[0] != pickle.PROTO[0]:
        return "neither a torch.save archive nor a legacy torch pickle" + (" (empty)" if not head else "")
    return None

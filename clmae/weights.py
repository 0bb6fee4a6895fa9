"""Where weights come from: checkpoint step directories, run directories and weight files, with strict
key checks. `clmae-export`, `clmae-viz`, `clmae-eval` and `checkpoint.init_from` all read weights here.

Sources:
- a clmae step directory (`<run_dir>/checkpoints/step_*`, complete) or a run directory (its newest complete
  checkpoint): each engine's ZeRO shards (any stage, written by any number of ranks) are consolidated into
  fp32 by DeepSpeed's own tool, on CPU, without a process group;
- a `.safetensors` file (clmae-export's output);
- a `.pth` / `.pt` file such as facebookresearch/mae's (`{"model": state_dict}`), read with
  `weights_only=True` (its `args` namespace is the only non-tensor object allowed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clmae.checkpoint import (
    ENGINE_TAG,
    STEP_DIR_PATTERN,
    CheckpointError,
    checkpoint_root,
    find_latest,
    is_complete,
    read_client_state,
    verify_checkpoint,
)
from clmae.config import Config, ConfigError, build_config
from clmae.models import MaskedAutoencoderViT
from clmae.specs import VIT_SPECS, model_image_size, timm_encoder_kwargs

# --------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A complete `step_*` directory: `path` itself, or the newest complete one of the run directory `path`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    if path.is_dir() and is_complete(path):
        verify_checkpoint(path)  # refuses a truncated or altered file, naming it
        return path
    if path.is_dir():
        found = find_latest(path)
        if found is not None:
            verify_checkpoint(found)
            return found
    raise CheckpointError(
        f"{path}: not a clmae checkpoint (expected a run directory with checkpoints/step_*/COMPLETE, "
        "or one such step directory)"
    )


def complete_step_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every complete checkpoint of a run, oldest first; CheckpointError if there is none."""
    root = checkpoint_root(Path(run_dir).expanduser())
    steps = sorted(p for p in root.glob("step_*") if STEP_DIR_PATTERN.match(p.name) and is_complete(p))
    if not steps:
        raise CheckpointError(f"{run_dir}: no complete checkpoints under {root}")
    for step_dir in steps:
        verify_checkpoint(step_dir)
    return steps


def checkpoint_config(step_dir: Path) -> Config:
    """The full config the checkpoint was trained with (saved in its client state)."""
    from clmae.config import CONFIG_DIR, DEFAULTS_NAME, deep_merge, read_yaml, upgrade_saved

    try:  # over the defaults: keys added to clmae after the checkpoint was written take their default
        defaults = read_yaml(CONFIG_DIR / f"{DEFAULTS_NAME}.yaml")
        return build_config(deep_merge(defaults, upgrade_saved(read_client_state(step_dir).config)))
    except ConfigError as err:
        raise CheckpointError(f"{step_dir}: its saved config is not valid for this version of clmae: {err}") from err


def consolidated_state_dict(path: str | os.PathLike, engine: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one engine ("mae", or the masking strategy's module such as "cmm") of a checkpoint,
    gathered from its ZeRO shards by DeepSpeed's own tool. `path`: a step directory or a run directory."""
    path = Path(path).expanduser()
    step_dir = path if is_complete(path) else find_latest(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: no complete clmae checkpoint here")
    if not (step_dir / engine / ENGINE_TAG).is_dir():
        raise CheckpointError(f"{step_dir}: has no '{engine}' engine state (a plain-MAE run has no 'cmm')")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir / engine), tag=ENGINE_TAG))


# --------------------------------------------------------------------------------------------------
# Weight files and strict checks
# --------------------------------------------------------------------------------------------------


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a weights-only `.pth` / `.pt` (bare or `{"model": ...}`)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a weights-only checkpoint ({type(err).__name__}: {err})") from err
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}")
    return state


def safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_mae_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The MAE's weights (encoder + decoder) from a checkpoint directory or a weights file."""
    path = Path(source).expanduser()
    return consolidated_state_dict(path, "mae") if path.is_dir() else read_weights_file(path)


def key_mismatches(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], missing_hint: str = "") -> str:
    """What `load_state_dict(strict=True)` would refuse, in words ('' when it fits): missing and unexpected
    keys and shape mismatches, a few examples of each."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s
    ]
    parts = [
        f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])}{missing_hint})" if missing else "",
        f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
        f"shape mismatch: {'; '.join(mismatched[:3])}" if mismatched else "",
    ]
    return "; ".join(p for p in parts if p)


def load_mae_weights(mae: torch.nn.Module, source: str | os.PathLike) -> None:
    """Initialise the MAE (encoder and decoder) from an existing checkpoint, strictly: a missing or
    unexpected key, or a shape that does not fit, is an error naming them."""
    state = read_mae_state_dict(source)
    problems = key_mismatches(
        state, {k: v.shape for k, v in mae.state_dict().items()}, "; an encoder-only file cannot start the decoder"
    )
    if problems:
        raise CheckpointError(f"checkpoint.init_from={source}: does not fit the {type(mae).__name__}: {problems}")
    mae.load_state_dict(state, strict=True)


def check_fits_timm(state: dict[str, torch.Tensor], kwargs: dict[str, Any], where: str) -> None:
    """Raise CheckpointError unless `state` loads strict into `timm.create_model(**kwargs)`: the same checks
    as `load_state_dict(strict=True)`, on a meta-device model (shapes only, instant even for ViT-H)."""
    import timm

    with torch.device("meta"):
        expected = {k: v.shape for k, v in timm.create_model(**kwargs).state_dict().items()}
    problems = key_mismatches(state, expected)
    if problems:
        raise CheckpointError(
            f"{where}: does not fit timm's {kwargs['model_name']} {describe_sizes(kwargs)}: {problems}"
        )


def describe_sizes(kwargs: dict[str, Any]) -> str:
    """`(224 px, patch 16, width 768, depth 12)` from timm_encoder_kwargs."""
    return (
        f"({kwargs['img_size']} px, patch {kwargs['patch_size']}, width {kwargs['embed_dim']}, depth {kwargs['depth']})"
    )


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def split_encoder(mae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of an MAE state dict (timm VisionTransformer names)."""
    return {k: v for k, v in mae_state.items() if k.split(".")[0] in MaskedAutoencoderViT.ENCODER_KEYS}


def infer_architecture(encoder_state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(model name, image size) of an encoder state dict, from its shapes: patch size, width and depth
    identify the VIT_SPECS entry (and with it the head count, which shapes cannot tell), the position
    embedding's length the image size."""
    try:
        proj = encoder_state["patch_embed.proj.weight"]  # (D, 3, p, p)
        num_tokens = encoder_state["pos_embed"].shape[1]  # 1 + (img / p) ** 2
    except KeyError as err:
        raise CheckpointError(f"not a ViT encoder state dict: no {err.args[0]!r}") from None
    depth = 1 + max((int(k.split(".")[1]) for k in encoder_state if k.startswith("blocks.")), default=-1)
    width, patch = proj.shape[0], proj.shape[-1]
    for name, spec in VIT_SPECS.items():
        if (spec.patch_size, spec.embed_dim, spec.depth) == (patch, width, depth):
            return name, round((num_tokens - 1) ** 0.5) * patch
    known = ", ".join(f"{n} (patch {s.patch_size}, width {s.embed_dim}, depth {s.depth})" for n, s in VIT_SPECS.items())
    raise CheckpointError(f"encoder with patch {patch}, width {width}, depth {depth} matches no known model: {known}")


@dataclass
class EncoderSource:
    """A pre-trained encoder and what is known about where it came from.

    state: timm VisionTransformer keys; model_name / img_size: our VIT_SPECS name and resolution;
    config: the pre-training config (None for a weights file); step_dir or file: the origin.
    """

    state: dict[str, torch.Tensor]
    model_name: str
    img_size: int
    config: Config | None
    pretrain_run_id: str | None
    step_dir: Path | None = None
    file: Path | None = None
    global_step: int | None = None

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        return timm_encoder_kwargs(self.model_name, self.img_size)

    @property
    def origin(self) -> Path:
        return self.step_dir if self.step_dir is not None else self.file

    def identity(self) -> dict[str, Any]:
        """What changes whenever the weights can have changed (keys feature caches)."""
        marker = self.step_dir / "COMPLETE" if self.step_dir is not None else self.file
        stat = marker.stat()
        return {"path": str(self.origin.resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}

    def build_timm(self) -> torch.nn.Module:
        """The headless timm ViT with these weights, loaded strict."""
        import timm

        model = timm.create_model(**self.timm_kwargs)
        model.load_state_dict(self.state, strict=True)
        return model


def load_encoder(source: str | os.PathLike) -> EncoderSource:
    """The encoder of a checkpoint directory (run or step; consolidated from its ZeRO shards) or of a weights
    file (an encoder exported by clmae-export, a full MAE, or facebookresearch/mae's `{"model": ...}`)."""
    from clmae.preflight import check_weights

    path = Path(source).expanduser()
    if path.is_file():
        check_weights(path, "checkpoint")  # a damaged or foreign file: one line, before torch.load
        state = split_encoder(read_weights_file(path))
        if not state:
            raise CheckpointError(f"{path}: holds no encoder weights (a masking-module export?)")
        name, img_size = infer_architecture(state)
        metadata = safetensors_metadata(path)
        check_fits_timm(state, timm_encoder_kwargs(name, img_size), where=str(path))
        return EncoderSource(state, name, img_size, None, metadata.get("clmae.pretrain_run_id"), file=path)
    step_dir = resolve_step_dir(path)
    cfg = checkpoint_config(step_dir)
    state = split_encoder(consolidated_state_dict(step_dir, "mae"))
    img_size = model_image_size(cfg.model)
    check_fits_timm(state, timm_encoder_kwargs(cfg.model.name, img_size), where=str(step_dir))
    client = read_client_state(step_dir)
    return EncoderSource(
        state, cfg.model.name, img_size, cfg, client.mlflow_run_id, step_dir=step_dir, global_step=client.global_step
    )

"""`clmae-export`: a checkpoint's encoder as a timm state dict, and where every evaluation gets its encoder.

    clmae-export runs/clmae_vitb --out vitb_encoder.safetensors
    clmae-export runs/clmae_vitb/checkpoints/step_000500000 --out clmae.pth --what all

The ZeRO-sharded engine states (any stage, written by any number of ranks) are consolidated into fp32 by
DeepSpeed's own tool (`clmae.checkpoint.consolidated_state_dict`), on CPU. The encoder's keys are those of
timm's VisionTransformer, so the file loads with `strict=True` into
`timm.create_model(<timm name>, num_classes=0)` (plus the sizes, for the CPU-sized `vit_tiny`).

Formats, by the output's suffix: `.safetensors` (tensors only, with the architecture and provenance in its
metadata) or `.pth` / `.pt` (a plain state dict for `torch.load(..., weights_only=True)`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clmae.checkpoint import CheckpointError, find_latest, is_complete, read_client_state, verify_checkpoint
from clmae.cli import run_main
from clmae.config import Config, ConfigError, build_config
from clmae.models import VIT_SPECS, MaskedAutoencoderViT, timm_encoder_kwargs

SUFFIXES = (".safetensors", ".pth", ".pt")
WHAT_CHOICES = ("encoder", "mae", "cmm", "all")


# --------------------------------------------------------------------------------------------------
# Where an encoder comes from: a checkpoint directory or a weights file
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


def run_dir_of(step_dir: Path) -> Path:
    """<run_dir>/checkpoints/step_X -> <run_dir>."""
    return step_dir.parent.parent


def checkpoint_config(step_dir: Path) -> Config:
    """The full config the checkpoint was trained with (saved in its client state)."""
    from clmae.config import CONFIG_DIR, DEFAULTS_NAME, deep_merge, read_yaml

    try:  # over the defaults: keys added to clmae after the checkpoint was written take their default
        defaults = read_yaml(CONFIG_DIR / f"{DEFAULTS_NAME}.yaml")
        return build_config(deep_merge(defaults, read_client_state(step_dir).config))
    except ConfigError as err:
        raise CheckpointError(f"{step_dir}: its saved config is not valid for this version of clmae: {err}") from err


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
    from clmae.checkpoint import consolidated_state_dict, read_mae_state_dict
    from clmae.preflight import check_weights

    path = Path(source).expanduser()
    if path.is_file():
        check_weights(path, "checkpoint")  # a damaged or foreign file: one line, before torch.load
        state = split_encoder(read_mae_state_dict(path))
        if not state:
            raise CheckpointError(f"{path}: holds no encoder weights (a masking-module export?)")
        name, img_size = infer_architecture(state)
        metadata = _safetensors_metadata(path)
        check_fits_timm(state, timm_encoder_kwargs(name, img_size), where=str(path))
        return EncoderSource(state, name, img_size, None, metadata.get("clmae.pretrain_run_id"), file=path)
    step_dir = resolve_step_dir(path)
    cfg = checkpoint_config(step_dir)
    state = split_encoder(consolidated_state_dict(step_dir, "mae"))
    img_size = cfg.model.img_size or VIT_SPECS[cfg.model.name].img_size
    check_fits_timm(state, timm_encoder_kwargs(cfg.model.name, img_size), where=str(step_dir))
    client = read_client_state(step_dir)
    return EncoderSource(
        state, cfg.model.name, img_size, cfg, client.mlflow_run_id, step_dir=step_dir, global_step=client.global_step
    )


def check_fits_timm(state: dict[str, torch.Tensor], kwargs: dict[str, Any], where: str) -> None:
    """Raise CheckpointError unless `state` loads strict into `timm.create_model(**kwargs)`: the same checks
    as `load_state_dict(strict=True)`, on a meta-device model (shapes only, instant even for ViT-H)."""
    import timm

    with torch.device("meta"):
        expected = {k: v.shape for k, v in timm.create_model(**kwargs).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"shape mismatch: {'; '.join(mismatched[:3])}" if mismatched else "",
        ]
        raise CheckpointError(
            f"{where}: does not fit timm's {kwargs['model_name']} {_sizes(kwargs)}: {'; '.join(p for p in parts if p)}"
        )


def _sizes(kwargs: dict[str, Any]) -> str:
    return (
        f"({kwargs['img_size']} px, patch {kwargs['patch_size']}, width {kwargs['embed_dim']}, depth {kwargs['depth']})"
    )


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def check_output_path(path: Path, overwrite: bool) -> None:
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown format; use one of {', '.join(SUFFIXES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory")


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write `state` as .safetensors (with `metadata`) or .pth, to a temporary name renamed into place, so
    that an interrupted export never leaves a file that looks whole."""
    # Own, contiguous storage per tensor: safetensors refuses shared or strided tensors, and a .pth of views
    # would drag their whole base storage along.
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def loading_snippet(path: Path, kwargs: dict[str, Any]) -> str:
    """Python that loads the exported encoder into timm, with only the sizes the timm name does not imply."""
    import timm

    with torch.device("meta"):
        implied = timm.create_model(kwargs["model_name"], num_classes=0)
    implied_sizes = {
        "img_size": implied.patch_embed.img_size[0],
        "patch_size": implied.patch_embed.patch_size[0],
        "embed_dim": implied.embed_dim,
        "depth": len(implied.blocks),
        "num_heads": implied.blocks[0].attn.num_heads,
    }
    extra = "".join(f", {k}={kwargs[k]}" for k, v in implied_sizes.items() if kwargs[k] != v)
    if path.suffix == ".safetensors":
        imports, read = "from safetensors.torch import load_file\n", f"load_file({str(path)!r})"
    else:
        imports, read = "", f"torch.load({str(path)!r}, weights_only=True)"
    return (
        f"import timm\nimport torch\n{imports}"
        f"model = timm.create_model({kwargs['model_name']!r}{extra}, num_classes=0)\n"
        f"model.load_state_dict({read}, strict=True)\n"
        "features = model(torch.randn(1, 3, "
        f"{kwargs['img_size']}, {kwargs['img_size']}))  # (1, {kwargs['embed_dim']}): the CLS token"
    )


def output_paths(out: Path, what: str) -> dict[str, Path]:
    """{"encoder" | "mae" | "cmm": file}; with `all`, OUT is the encoder and the others sit beside it."""
    if what != "all":
        return {what: out}
    return {
        "encoder": out,
        "mae": out.with_name(f"{out.stem}_mae{out.suffix}"),
        "cmm": out.with_name(f"{out.stem}_cmm{out.suffix}"),
    }


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, what: str = "encoder", overwrite: bool = False):
    """Consolidate `checkpoint` and write the requested parts. Returns ({part: path}, timm kwargs)."""
    from clmae.checkpoint import consolidated_state_dict

    if what not in WHAT_CHOICES:
        raise ConfigError(f"--what {what}: choose one of {', '.join(WHAT_CHOICES)}")
    targets = output_paths(Path(out).expanduser(), what)
    for path in targets.values():  # refuse before the (long) consolidation, and before writing anything
        check_output_path(path, overwrite)
    step_dir = resolve_step_dir(checkpoint)
    cfg = checkpoint_config(step_dir)
    client = read_client_state(step_dir)
    img_size = cfg.model.img_size or VIT_SPECS[cfg.model.name].img_size
    kwargs = timm_encoder_kwargs(cfg.model.name, img_size)
    if "cmm" in targets and cfg.masking.mode != "curriculum":
        raise CheckpointError(f"{step_dir}: a plain-MAE run (masking.mode={cfg.masking.mode}) has no masking module")
    metadata = {
        "format": "pt",
        "clmae.model": cfg.model.name,
        "clmae.img_size": str(img_size),
        "clmae.source": str(step_dir.resolve()),
        "clmae.global_step": str(client.global_step),
        "clmae.pretrain_run_id": client.mlflow_run_id or "",
        "timm.model_name": kwargs["model_name"],
    }
    mae_state = consolidated_state_dict(step_dir, "mae") if {"encoder", "mae"} & set(targets) else None
    written = {}
    for part, path in targets.items():
        if part == "encoder":
            state = split_encoder(mae_state)
            check_fits_timm(state, kwargs, where=str(step_dir))
        elif part == "mae":
            state = mae_state
        else:
            state = consolidated_state_dict(step_dir, "cmm")
        written[part] = save_state_dict(state, path, {**metadata, "clmae.part": part})
    return written, kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clmae-export",
        description="Consolidate a (ZeRO-sharded) clmae checkpoint and write its encoder as a timm state dict.",
        epilog="example: clmae-export runs/tiny_digits --out encoder.safetensors",
    )
    parser.add_argument("checkpoint", help="a run directory (its newest complete checkpoint) or a step_* directory")
    parser.add_argument("--out", required=True, help="output file: .safetensors or .pth")
    parser.add_argument(
        "--what",
        choices=WHAT_CHOICES,
        default="encoder",
        help="encoder: timm ViT weights (default); mae: encoder + decoder (checkpoint.init_from can start from it); "
        "cmm: the masking module; all: OUT is the encoder, OUT_mae and OUT_cmm beside it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    written, kwargs = export(args.checkpoint, args.out, args.what, args.overwrite)
    for part, path in written.items():
        print(f"wrote {part}: {path}")
    if "encoder" in written:
        print(f"timm model: {kwargs['model_name']} {_sizes(kwargs)}, num_classes=0; load it with:\n")
        print(loading_snippet(written["encoder"], kwargs))
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()

"""`clmae-export`: a checkpoint's encoder as a timm state dict (or its MAE, or its masking module).

    clmae-export runs/clmae_vitb --out vitb_encoder.safetensors
    clmae-export runs/clmae_vitb/checkpoints/step_000500000 --out clmae.pth --what all

The ZeRO-sharded engine states (any stage, written by any number of ranks) are consolidated into fp32 by
DeepSpeed's own tool (`clmae.weights.consolidated_state_dict`), on CPU. The encoder's keys are those of
timm's VisionTransformer, so the file loads with `strict=True` into
`timm.create_model(<timm name>, num_classes=0)` (plus the sizes, for the CPU-sized `vit_tiny`).

Formats, by the output's suffix: `.safetensors` (tensors only, with the architecture and provenance in its
metadata) or `.pth` / `.pt` (a plain state dict for `torch.load(..., weights_only=True)`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from clmae.checkpoint import CheckpointError, read_client_state
from clmae.cli import run_main
from clmae.config import ConfigError
from clmae.files import atomic_path
from clmae.specs import model_image_size, timm_encoder_kwargs
from clmae.weights import (
    check_fits_timm,
    checkpoint_config,
    consolidated_state_dict,
    describe_sizes,
    resolve_step_dir,
    split_encoder,
)

SUFFIXES = (".safetensors", ".pth", ".pt")
WHAT_CHOICES = ("encoder", "mae", "cmm", "all")


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
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
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
    from clmae.masking import strategy_class

    if what not in WHAT_CHOICES:
        raise ConfigError(f"--what {what}: choose one of {', '.join(WHAT_CHOICES)}")
    targets = output_paths(Path(out).expanduser(), what)
    for path in targets.values():  # refuse before the (long) consolidation, and before writing anything
        check_output_path(path, overwrite)
    step_dir = resolve_step_dir(checkpoint)
    cfg = checkpoint_config(step_dir)
    client = read_client_state(step_dir)
    img_size = model_image_size(cfg.model)
    kwargs = timm_encoder_kwargs(cfg.model.name, img_size)
    masking_module = strategy_class(cfg.masking.mode).module_name
    if "cmm" in targets and masking_module is None:
        raise CheckpointError(f"{step_dir}: masking.mode={cfg.masking.mode} trains no masking module to export")
    metadata = {
        "format": "pt",
        "clmae.model": cfg.model.name,
        "clmae.img_size": str(img_size),
        "clmae.source": str(step_dir.resolve()),
        "clmae.global_step": str(client.global_step),
        "clmae.pretrain_run_id": client.mlflow_run_id or "",
        "timm.model_name": kwargs["model_name"],
        # The complete timm.create_model arguments: the file alone says how to build the model it loads into,
        # sizes included (the CPU-sized vit_tiny is not what its timm name implies).
        "timm.create_model_kwargs": json.dumps(kwargs, sort_keys=True),
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
            state = consolidated_state_dict(step_dir, masking_module)
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
        print(f"timm model: {kwargs['model_name']} {describe_sizes(kwargs)}, num_classes=0; load it with:\n")
        print(loading_snippet(written["encoder"], kwargs))
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()

"""The frozen encoder's features over a .beton, computed once per (encoder, data file) and cached on disk.

Per image: after the encoder's final norm, the CLS token (the linear probe's and the cosine k-NN's input,
as in MAE and DINO) and the mean of the patch tokens (our L2 k-NN variant's input); and the mean of the
patch tokens BEFORE the final norm (the reference k-NN's input: its `global_pool` model drops that norm).
Images come from the evaluation loader: centre crop of `data.eval_crop_ratio` of the shorter side resized to
the model's size, no augmentation, every image once. Every rank encodes its contiguous share and the shares
are gathered in rank order, which is file order, so row i is sample i of the file on every rank.

Few-shot's 15 probes and both k-NN protocols then cost one forward pass over each file: the cache key is the
encoder's identity (checkpoint path and the mtime of its COMPLETE marker, or the weights file's path, size
and mtime), the data file's (path, size, mtime) and the preprocessing (image size, evaluation transform, including a
dataset.json's, and interpolation).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from clmae import dist
from clmae.config import Config
from clmae.dist import DistEnv
from clmae.files import atomic_path

CACHE_FORMAT = 2  # bump when what a cache file holds changes


@dataclass
class Features:
    cls: Tensor  # (N, D) CLS token
    patch_mean: Tensor  # (N, D) mean of the L patch tokens (after the final norm)
    labels: Tensor  # (N,) int64
    patch_mean_prenorm: Tensor  # (N, D) mean of the L patch tokens before the final norm

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Features:
        return Features(**{name: t.to(device) for name, t in self.to_dict().items()})

    def to_dict(self) -> dict[str, Tensor]:
        return {
            "cls": self.cls,
            "patch_mean": self.patch_mean,
            "labels": self.labels,
            "patch_mean_prenorm": self.patch_mean_prenorm,
        }


def encode(encoder: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """images: (B, 3, H, W) -> (CLS (B, D), mean patch token (B, D), mean patch token before the final norm
    (B, D)), from a timm VisionTransformer."""
    prenorm = []
    # The final norm's input is the last block's output: one forward gives both.
    hook = encoder.norm.register_forward_hook(lambda module, inputs, output: prenorm.append(inputs[0]))
    try:
        tokens = encoder.forward_features(images)  # (B, prefix + L, D), after the final norm
    finally:
        hook.remove()
    start = encoder.num_prefix_tokens
    return tokens[:, 0], tokens[:, start:].mean(dim=1), prenorm[0][:, start:].mean(dim=1)


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order (n_r may differ by rank); identity alone."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return local
    world = tdist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world)]
    tdist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)])


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, desc: str) -> Features:
    """Encode every image of `loader` (this rank's share of an evaluation loader), gathered over ranks."""
    encoder.eval()
    cls_parts, mean_parts, prenorm_parts, label_parts = [], [], [], []
    # bf16 on GPU as in MAE's evaluation; features are kept in fp32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, labels in dist.progress(loader.iterate_epoch(0), total=len(loader), desc=desc):
        with autocast:
            cls, patch_mean, patch_mean_prenorm = encode(encoder, images)
        cls_parts.append(cls.float())
        mean_parts.append(patch_mean.float())
        prenorm_parts.append(patch_mean_prenorm.float())
        # A copy: CPU batches are views into FFCV's ring of buffers, refilled a few batches later.
        label_parts.append(labels.to(device, dtype=torch.int64, copy=True))
    width = encoder.embed_dim
    empty = torch.empty((0, width), device=device)
    local = Features(
        cls=torch.cat(cls_parts) if cls_parts else empty,
        patch_mean=torch.cat(mean_parts) if mean_parts else empty,
        labels=torch.cat(label_parts) if label_parts else torch.empty(0, dtype=torch.int64, device=device),
        patch_mean_prenorm=torch.cat(prenorm_parts) if prenorm_parts else empty,
    )
    return Features(**{name: gather_rows(t).cpu() for name, t in local.to_dict().items()})


def _file_identity(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_file(cache_dir: Path, encoder_identity: dict, data_path: Path, img_size: int, cfg: Config) -> Path:
    """Where the features of `data_path` are cached: keyed by everything that changes their pixels or weights
    (the encoder, the file, the image size, the evaluation transform, including a dataset.json's, and the
    interpolation)."""
    import dataclasses

    from clmae.data import EvalTransform

    transform = EvalTransform.for_file(data_path, cfg.data.eval_crop_ratio)
    key = {
        "format": CACHE_FORMAT,
        "encoder": encoder_identity,
        "data": _file_identity(data_path),
        "img_size": img_size,
        "eval_transform": dataclasses.asdict(transform),
        "interpolation": cfg.data.interpolation,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{data_path.stem}-{digest}.pt"


def _agree(value: bool) -> bool:
    """Rank 0's answer, on every rank (so that all ranks take the same branch of a collective)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    holder = [value]
    tdist.broadcast_object_list(holder, src=0)
    return bool(holder[0])


def cached_features(
    encoder: nn.Module,
    encoder_identity: dict,
    data_path: str | os.PathLike,
    cfg: Config,
    env: DistEnv,
    cache_dir: Path,
) -> Features:
    """Features of every image of `data_path`, from the cache or from one distributed forward pass.

    Collective: every rank calls it and gets the whole set. The encoder must already be on env.device.
    """
    from clmae.data import build_eval_loader

    data_path = Path(data_path)
    if not data_path.is_file():
        raise FileNotFoundError(f"{data_path} does not exist; write it with `clmae-prep`")
    img_size = encoder.patch_embed.img_size[0]
    path = cache_file(cache_dir, encoder_identity, data_path, img_size, cfg)
    if _agree(path.is_file()):
        dist.log(f"features of {data_path}: cached in {path}")
        return Features(**torch.load(path, weights_only=True))
    device = torch.device(env.device)
    loader = build_eval_loader(cfg, env, device, img_size=img_size, path=str(data_path))
    features = extract_features(encoder, loader, device, desc=f"features {data_path.name}")
    if env.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a concurrent or interrupted writer never leaves half a cache file
            torch.save(features.to_dict(), tmp)
        dist.log(f"features of {data_path}: {len(features)} images, cached in {path}")
    return features

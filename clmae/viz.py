"""`clmae-viz`: pictures of the curriculum masking module's masks."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HIDDEN_GREY = 0.5


@torch.no_grad()
def render_masks(
    mae: nn.Module,
    cmm: nn.Module | None,
    images: Tensor,
    norm_pix_loss: bool,
    min_cell: int = 96,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """A picture of what the masking module hides (paper figures 2-4): one column per image, rows
    original | masked (hidden patches grey) | reconstruction (visible patches pasted back) | m (white = keep).

    images: (N, 3, H, W), normalised as the loader gives them. Plain modules, not engines; every rank
    must call this under ZeRO-3 (the forward gathers parameters). Returns (rows * cell, N * cell, 3) uint8.
    """
    was_training = mae.training
    mae.eval()
    dtype = next(mae.parameters()).dtype
    images = images.to(dtype)
    pred, hidden, keep = mae(images, cmm)
    pred, hidden, keep, images = pred.float(), hidden.float(), keep.float(), images.float()
    mae.train(was_training)

    target = mae.patchify(images)
    if norm_pix_loss:
        # The decoder predicts each patch normalised by its own mean/std: undo that with the true patch's.
        mean_p, var_p = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var_p + 1e-6) ** 0.5 + mean_p
    hidden_p = hidden.unsqueeze(-1)
    masked = mae.unpatchify(target * (1 - hidden_p) + _normalised_grey(mean, std, target) * hidden_p)
    pasted = mae.unpatchify(target * (1 - hidden_p) + pred * hidden_p)

    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    rows = [(x.cpu() * std_t + mean_t).clamp(0, 1) for x in (images, masked, pasted)]
    grid_size = int(keep.shape[1] ** 0.5)
    keep_map = keep.view(-1, 1, grid_size, grid_size).cpu()
    rows.append(torch.nn.functional.interpolate(keep_map, size=images.shape[-2:], mode="nearest").expand(-1, 3, -1, -1))

    factor = max(1, -(-min_cell // images.shape[-1]))  # upscale small images so patches stay visible
    picture = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows*H, N*W)
    picture = picture.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _normalised_grey(mean, std, like: Tensor) -> Tensor:
    """Mid grey in normalised space, laid out like a patch (p, p, 3) flattened: (P,)."""
    grey = (HIDDEN_GREY - torch.tensor(mean)) / torch.tensor(std)
    return grey.to(like).repeat(like.shape[-1] // 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-viz", description="Draw the masks of a trained CL-MAE.")
    sub = parser.add_subparsers(dest="what", required=True)
    masks = sub.add_parser("masks", help="image, masked image and reconstruction for a few images")
    masks.add_argument("checkpoint", nargs="?", help="a checkpoint directory")
    masks.add_argument("--images", nargs="+", help="image files")
    masks.add_argument("--out", help="output PNG")
    masks.add_argument("--over-training", metavar="RUN_DIR", help="the same images across saved checkpoints")
    return parser


def main() -> None:
    build_parser().parse_args()
    print("clmae-viz: not available yet (issue 7)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

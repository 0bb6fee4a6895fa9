"""`clmae-viz`: pictures of the curriculum masking module's masks (paper figures 2-4).

    clmae-viz masks runs/tiny_digits --images a.png b.jpg --out masks.png
    clmae-viz masks runs/tiny_digits --from-val 8 --out masks.png
    clmae-viz masks --over-training runs/tiny_digits --from-val 8 --out over_training.png

One column per image; rows: the image, the image with the hidden patches grey, the reconstruction (visible
patches pasted back), the masking module's keep scores m (white = keep). Over training: one such band per
saved checkpoint, oldest first, each under a label with its step and epoch. Image files are resized (shorter
side) and centre-cropped to the model's size; `--from-val N` takes the first N images of the run's validation
.beton instead. Plain-MAE runs draw random masks (seeded by run.seed).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from clmae.files import atomic_path
from clmae.specs import IMAGENET_MEAN, IMAGENET_STD, model_image_size

HIDDEN_GREY = 0.5


@torch.no_grad()
def render_masks(
    mae: nn.Module,
    scorer: Callable[[Tensor], Tensor] | None,
    images: Tensor,
    norm_pix_loss: bool,
    min_cell: int = 96,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """A picture of what the masking module hides (paper figures 2-4): one column per image, rows
    original | masked (hidden patches grey) | reconstruction (visible patches pasted back) | m (white = keep).

    scorer: the masking strategy's keep scores (`MaskingStrategy.scorer`: the CMM, or None for random masks).
    images: (N, 3, H, W), normalised as the loader gives them. Plain modules, not engines; every rank
    must call this under ZeRO-3 (the forward gathers parameters). Returns (rows * cell, N * cell, 3) uint8.
    """
    was_training = mae.training
    mae.eval()
    dtype = next(mae.parameters()).dtype
    images = images.to(dtype)
    pred, hidden, keep = mae(images, scorer)
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


def load_image_files(paths: list[str], size: int) -> Tensor:
    """Image files -> (N, 3, size, size), normalised: shorter side resized to `size` (bicubic), centre crop."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from clmae.errors import ClmaeError

    images = []
    for name in paths:
        try:
            with Image.open(name) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"--images: {name} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ClmaeError(f"--images: {name} is not a readable image ({err})") from None
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(images) - mean) / std


def first_val_images(cfg, count: int) -> Tensor:
    """The first `count` images of `data.val_path`, as validation sees them: (count, 3, H, W)."""
    from clmae.data import build_eval_loader
    from clmae.dist import DistEnv

    loader = build_eval_loader(cfg, DistEnv.single(), "cpu")
    batches = loader.iterate_epoch(0)
    collected, total = [], 0
    for images, _ in batches:
        collected.append(images.clone())  # a view into FFCV's ring of buffers otherwise
        total += images.shape[0]
        if total >= count:
            break
    batches.close()
    return torch.cat(collected)[:count]


def render_checkpoint(step_dir: Path, cfg, images: Tensor) -> np.ndarray:
    """The picture of `images` under the masks of a checkpoint: its MAE and its masking strategy's module
    (for curriculum runs, the CMM), consolidated to fp32, on CPU."""
    from clmae.masking import build_strategy
    from clmae.models import build_models
    from clmae.weights import consolidated_state_dict, load_mae_weights

    strategy = build_strategy(cfg)
    mae, module = build_models(cfg)
    load_mae_weights(mae, step_dir)
    if module is not None:
        module.load_state_dict(consolidated_state_dict(step_dir, strategy.module_name), strict=True)
    torch.manual_seed(cfg.run.seed)  # plain MAE's random masks: the same in every band
    return render_masks(mae, strategy.scorer(module), images, cfg.model.norm_pix_loss)


def label_band(picture: np.ndarray, text: str, height: int = 16) -> np.ndarray:
    """picture (H, W, 3) uint8 with a white strip of `height` px above it carrying `text`."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (picture.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), picture], axis=0)


def save_png(picture: np.ndarray, path: Path, overwrite: bool) -> None:
    from PIL import Image

    if path.suffix.lower() != ".png":
        raise FileNotFoundError(f"--out {path}: the picture is written as PNG; name it *.png")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-viz", description="Draw the masks of a trained CL-MAE.")
    sub = parser.add_subparsers(dest="what", required=True)
    masks = sub.add_parser(
        "masks",
        help="image, masked image, reconstruction and keep scores for a few images",
        description="image, masked image, reconstruction and keep scores for a few images",
    )
    masks.add_argument("checkpoint", nargs="?", help="a run directory (newest checkpoint) or a step_* directory")
    masks.add_argument("--over-training", metavar="RUN_DIR", help="the same images across the run's saved checkpoints")
    source = masks.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="IMG", help="image files (any format PIL reads)")
    source.add_argument("--from-val", type=int, metavar="N", help="the first N images of the run's validation .beton")
    masks.add_argument("--out", type=Path, required=True, help="output PNG")
    masks.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def _main(argv: list[str] | None = None) -> int:
    from clmae.checkpoint import CheckpointError, read_client_state
    from clmae.weights import checkpoint_config, complete_step_dirs, resolve_step_dir

    args = build_parser().parse_args(argv)
    if (args.checkpoint is None) == (args.over_training is None):
        raise CheckpointError("give either a CHECKPOINT or --over-training RUN_DIR")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    if args.over_training is not None:
        steps = complete_step_dirs(args.over_training)
    else:
        steps = [resolve_step_dir(args.checkpoint)]
    cfg = checkpoint_config(steps[-1])
    if args.from_val is not None:
        if args.from_val < 1:
            raise CheckpointError(f"--from-val {args.from_val}: need at least one image")
        images = first_val_images(cfg, args.from_val)
    else:
        images = load_image_files(args.images, model_image_size(cfg.model))
    bands = []
    for step_dir in steps:
        picture = render_checkpoint(step_dir, checkpoint_config(step_dir), images)
        if args.over_training is not None:
            state = read_client_state(step_dir)
            picture = label_band(picture, f"step {state.global_step} (epoch {state.epoch})")
        bands.append(picture)
    save_png(np.concatenate(bands, axis=0), args.out, args.overwrite)
    print(f"wrote {args.out} ({len(steps)} checkpoint(s), {images.shape[0]} image(s))")
    return 0


def main() -> None:
    from clmae.cli import run_main

    run_main(_main)


if __name__ == "__main__":
    main()

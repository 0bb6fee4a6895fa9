"""`clmae-viz`: pictures of the curriculum masking module's masks (paper figures 2-4).

    clmae-viz masks runs/tiny_digits --images a.png b.jpg --out masks.png
    clmae-viz masks runs/tiny_digits --from-val 8 --out masks.png
    clmae-viz masks --over-training runs/tiny_digits --from-val 8 --out over_training.png
    clmae-viz curriculum runs/tiny_digits          # masks_over_training.png + mask_stats.png, the whole run

One column per image; rows: the image, the image with the hidden patches grey, the reconstruction (visible
patches pasted back), the masking module's keep scores m (white = keep). Over training: one such band per
saved checkpoint, oldest first, each under a label with its step and epoch. Image files are resized (shorter
side) and centre-cropped to the model's size; `--from-val N` takes the first N images of the run's validation
.beton instead. Plain-MAE runs draw random masks (seeded by run.seed).

`--over-training` only sees the checkpoints still on disk (checkpoint.keep_last). The whole run is in
<run_dir>/curriculum/, which training writes at every epoch boundary (small, never pruned): the labelled
picture of the first validation images every tracking.mask_images_every_epochs and the masks' statistics
every epoch. `clmae-viz curriculum` draws both.
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
    original | masked (hidden patches grey) | reconstruction (visible patches pasted back) | m (white = keep),
    each row named in a column of LEGEND_WIDTH px on the left (ROW_LABELS).

    scorer: the masking strategy's keep scores (`MaskingStrategy.scorer`: the CMM, or None for random masks).
    images: (N, 3, H, W), normalised as the loader gives them. Plain modules, not engines; every rank
    must call this under ZeRO-3 (the forward gathers parameters). Returns (rows * cell, LEGEND_WIDTH + N * cell, 3)
    uint8.
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
    picture = (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return row_legend(picture, ROW_LABELS)


# What each strip of a mask picture shows, written on its left (render_masks' rows, top to bottom).
ROW_LABELS = (
    "image",
    "what the MAE sees: grey patches are hidden",
    "reconstruction: visible patches as they are, hidden ones as predicted (blurry, noisy)",
    "m, the keep score per patch: white = keep visible, black = hide",
)
LEGEND_WIDTH = 128  # px of the labels' column on the left of a mask picture


def row_legend(picture: np.ndarray, labels: tuple[str, ...], width: int = LEGEND_WIDTH) -> np.ndarray:
    """picture (H, W, 3) uint8 of len(labels) equal strips, with a white column of `width` px on its left that
    names each strip (wrapped to the column)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    strip_height = picture.shape[0] // len(labels)
    column = Image.new("RGB", (width, picture.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(column)
    font = ImageFont.load_default(size=11)  # Pillow's own TrueType font (its bitmap font without FreeType)
    chars_per_line = max(8, (width - 8) // 6)
    for index, label in enumerate(labels):
        lines = textwrap.wrap(label, chars_per_line)
        draw.multiline_text((4, index * strip_height + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        if index:
            draw.line([(0, index * strip_height), (width, index * strip_height)], fill=(200, 200, 200))
    return np.concatenate([np.asarray(column), picture], axis=1)


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
    from clmae.masking import build_models, build_strategy
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


# ---- the curriculum over a whole run (kept in <run_dir>/curriculum/, independent of checkpoint pruning) ----

CURRICULUM_DIR = "curriculum"
NEUTRAL_BAND = 0.15  # |lambda| up to this is labelled "near neutral"
STATS_FILE = "stats.json"
STAT_LABELS = {
    "kept": "fraction kept (mean m)",
    "entropy": "entropy of m (bits)",
    "diversity": "diversity across images (RMS of m_a - m_b)",
    "rec_soft": "L_rec_soft",
}


@torch.no_grad()
def mask_statistics(mae: nn.Module, scorer: Callable[[Tensor], Tensor], images: Tensor, norm_pix_loss: bool) -> dict:
    """The masking module's keep scores m (N, L) on fixed images, summarised:
    kept: mean m, the soft visible fraction (the MAE step's hard masks keep exactly 1 - r);
    entropy: mean binary entropy of m in bits (1 = undecided, 0 = binary masks);
    diversity: mean over image pairs of the RMS difference of their m (0 = every image gets the same mask);
    rec_soft: L_rec_soft, the soft-mask reconstruction error that the CMM step weighs by lambda.
    Plain modules; every rank must call this under ZeRO-3 (the forward gathers parameters)."""
    from clmae.losses import reconstruction_loss, reconstruction_target

    was_training = mae.training
    mae.eval()
    dtype = next(mae.parameters()).dtype
    pred, hidden, keep = mae(images.to(dtype), scorer, soft=True)
    mae.train(was_training)
    target = reconstruction_target(mae.patchify(images.to(dtype)), norm_pix_loss)
    keep = keep.float()
    entropy = -(torch.special.xlogy(keep, keep) + torch.special.xlogy(1 - keep, 1 - keep)) / np.log(2)
    pairs = torch.pdist(keep) / keep.shape[1] ** 0.5 if keep.shape[0] > 1 else keep.new_zeros(1)
    return {
        "kept": keep.mean().item(),
        "entropy": entropy.mean().item(),
        "diversity": pairs.mean().item(),
        "rec_soft": reconstruction_loss(pred.float(), target.float(), hidden.float()).item(),
    }


def curriculum_label(epoch: int, lam: float | None) -> str:
    """Which masks a band shows: those after `epoch` epochs, trained last with curriculum factor `lam`."""
    if lam is None:
        return f"epoch {epoch}: before training"
    phase = "partner" if lam > NEUTRAL_BAND else "adversary" if lam < -NEUTRAL_BAND else "near neutral"
    return f"epoch {epoch}: lambda {lam:+.2f} ({phase})"


def save_curriculum_snapshot(
    run_dir: Path, epoch: int, lam: float | None, stats: dict | None, picture: np.ndarray | None
) -> None:
    """Record the masks after `epoch` epochs in <run_dir>/curriculum/: the labelled picture and the statistics,
    each when given (one entry per epoch in stats.json; a resumed run replaces its epoch's entry)."""
    import json

    from clmae.files import write_atomic

    folder = Path(run_dir) / CURRICULUM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if picture is not None:
        save_png(picture, folder / f"masks_epoch_{epoch:05d}.png", overwrite=True)
    if stats is None:
        return
    records = load_curriculum_stats(run_dir)
    records[epoch] = {"epoch": epoch, "lambda": lam, **stats}
    write_atomic(folder / STATS_FILE, json.dumps([records[e] for e in sorted(records)], indent=1) + "\n")


def load_curriculum_stats(run_dir: Path) -> dict[int, dict]:
    import json

    path = Path(run_dir) / CURRICULUM_DIR / STATS_FILE
    return {r["epoch"]: r for r in json.loads(path.read_text())} if path.is_file() else {}


def curriculum_pictures(run_dir: Path) -> list[Path]:
    """The saved, labelled mask pictures of a run, oldest first."""
    return sorted((Path(run_dir) / CURRICULUM_DIR).glob("masks_epoch_*.png"))


def stack_pictures(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    bands = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    width = max(band.shape[1] for band in bands)
    padded = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in bands]
    return np.concatenate(padded, axis=0)


def plot_curriculum_stats(records: list[dict], lambdas: list[float], path: Path) -> None:
    """One panel per statistic over the epochs; the background marks the curriculum's phase (green: partner,
    lambda > 0; grey: lambda = 0; red: adversary, lambda < 0) and a line on the first panel plots lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(STAT_LABELS), 1, figsize=(7, 2.1 * len(STAT_LABELS)), sharex=True)
    epochs = [r["epoch"] for r in records]
    for ax, (key, label) in zip(axes, STAT_LABELS.items(), strict=True):
        for epoch, lam in enumerate(lambdas):  # epoch e trains from e to e + 1
            colour = "tab:green" if lam > 0 else "tab:red" if lam < 0 else "grey"
            ax.axvspan(epoch, epoch + 1, color=colour, alpha=0.06 + 0.12 * abs(lam), linewidth=0)
        ax.plot(epochs, [r[key] for r in records], marker="o", color="black")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    twin = axes[0].twinx()
    twin.step(range(len(lambdas) + 1), [*lambdas, lambdas[-1]], where="post", color="tab:blue", alpha=0.7)
    twin.set_ylabel("lambda", color="tab:blue", fontsize=8)
    twin.set_ylim(-1.1, 1.1)
    axes[0].set_title("masks on fixed validation images; background: partner (green) -> adversary (red)", fontsize=9)
    axes[-1].set_xlabel("epochs trained")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


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
    curriculum = sub.add_parser(
        "curriculum",
        help="the masks and their statistics across a whole run (what training kept in RUN_DIR/curriculum/)",
        description="masks_over_training.png: the fixed validation images' masks at every "
        "tracking.mask_images_every_epochs, each row labelled with its epoch and lambda; mask_stats.png: "
        "fraction kept, entropy, diversity across images and L_rec_soft over the epochs, curriculum phase marked",
    )
    curriculum.add_argument("run_dir", type=Path, help="a pre-training run directory")
    curriculum.add_argument("--out-dir", type=Path, help="where the two PNGs go (default: RUN_DIR)")
    return parser


def curriculum_main(run_dir: Path, out_dir: Path | None) -> dict[str, Path]:
    """Write RUN_DIR's masks_over_training.png and mask_stats.png (see the `curriculum` subcommand)."""
    from clmae.checkpoint import CheckpointError
    from clmae.config import load_config
    from clmae.curriculum import curriculum_factor

    pictures, records = curriculum_pictures(run_dir), load_curriculum_stats(run_dir)
    if not pictures and not records:
        raise CheckpointError(
            f"{run_dir}: no {CURRICULUM_DIR}/ record (a run with tracking.mask_images_every_epochs > 0 writes it)"
        )
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if pictures:
        written["masks"] = out_dir / "masks_over_training.png"
        save_png(stack_pictures(pictures), written["masks"], overwrite=True)
    if records:
        cfg = load_config(run_dir / "config.yaml")
        total = cfg.train.epochs
        lambdas = [curriculum_factor(e, total, schedule=cfg.curriculum.schedule) for e in range(total)]
        written["stats"] = out_dir / "mask_stats.png"
        plot_curriculum_stats([records[e] for e in sorted(records)], lambdas, written["stats"])
    return written


def _main(argv: list[str] | None = None) -> int:
    from clmae.checkpoint import CheckpointError, read_client_state
    from clmae.weights import checkpoint_config, complete_step_dirs, resolve_step_dir

    args = build_parser().parse_args(argv)
    if args.what == "curriculum":
        for what, path in curriculum_main(args.run_dir, args.out_dir).items():
            print(f"wrote {path} ({what})")
        return 0
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

"""Images/s of the FFCV pre-training loader, bicubic and area, against the plain PyTorch loader a user would
otherwise write.

All read the same generated JPEG set (224 x 224 px by default, as ImageNet images are commonly stored
pre-resized; `--side-range 300 500` for full-size ImageNet-like images) with the same augmentation
(RandomResizedCrop to 224, scale (0.2, 1.0); horizontal flip; ImageNet normalisation to float32 NCHW),
the same batch size and the same number of workers, in one run:

- FFCV: `clmae.data.build_pretrain_loader` over a .beton written by data_prep (FFCV's ImageNet recipe by
  default: longest side <= 500, half the images JPEG at quality 90, half raw), `--workers` decoding threads,
  once per `data.interpolation`: bicubic (our antialiased bicubic, Pillow's filter, the default) and area
  (FFCV's built-in OpenCV INTER_AREA).
- PyTorch: torchvision ImageFolder + PIL, RandomResizedCrop(224, scale (0.2, 1), bicubic) + flip + ToTensor
  + Normalize, torch DataLoader with `--workers` worker processes.

Each loader runs one warm-up epoch (FFCV compiles its pipeline then; PyTorch starts its workers), then the
loaders take turns for `--epochs` timed epochs. The images and the .beton files are generated once and
reused from `--data-dir`.

    python benchmarks/loader_throughput.py --data-dir /tmp/loader_bench --workers 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

IMG_SIZE = 224
NUM_CLASSES = 10


def generate_jpegs(root: Path, count: int, sides: tuple[int, int], seed: int = 0) -> Path:
    """`count` JPEGs in NUM_CLASSES class folders: smooth colour fields with sensor-like noise, each side drawn
    from `sides` (inclusive), quality 90 (about 0.5 bytes per pixel, near ImageNet's density). Skipped when
    already there."""
    done = root.with_name(f"{root.name}.complete")  # outside the tree: not an image to convert
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(side) for side in rng.integers(sides[0], sides[1] + 1, 2))
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        pixels = np.clip(field + rng.normal(0, 16, (height, width, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class_{index % NUM_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    done.touch()
    return root


def convert(jpegs: Path, out: Path, write_mode: str, workers: int) -> Path:
    from data_prep.outputs import WriteOptions
    from data_prep.sources import scan_class_tree
    from data_prep.writer import write_files

    if not out.exists():
        print(write_files(scan_class_tree(jpegs), out, WriteOptions(write_mode=write_mode, workers=workers)).summary())
    return out


def epoch_rate(epoch_batches) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in epoch_batches:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def ffcv_epochs(beton: Path, batch_size: int, workers: int, os_cache: bool, interpolation: str):
    from clmae.config import load_config
    from clmae.data import build_pretrain_loader

    data = {
        "train_path": beton,
        "batch_size": batch_size,
        "num_workers": workers,
        "os_cache": str(os_cache).lower(),
        "interpolation": interpolation,
    }
    cfg = load_config(None, [f"data.{key}={value}" for key, value in data.items()])
    loader = build_pretrain_loader(cfg, SimpleNamespace(rank=0, world_size=1), "cpu", img_size=IMG_SIZE)
    return loader.iterate_epoch


def pytorch_epochs(jpegs: Path, batch_size: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    from clmae.data import IMAGENET_MEAN, IMAGENET_STD

    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                IMG_SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(jpegs), transform=augment),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
    )
    return lambda epoch: loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="generated JPEGs and .beton are cached here")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument(
        "--side-range",
        type=int,
        nargs=2,
        default=[IMG_SIZE, IMG_SIZE],
        metavar=("MIN", "MAX"),
        help="pixels per image side of the generated JPEGs (default: 224 x 224)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader, after one warm-up epoch")
    parser.add_argument(
        "--os-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FFCV reads through the OS page cache (data.os_cache; FFCV's advice when the file fits in memory, "
        "as this one does); --no-os-cache: FFCV's process cache, which copies each epoch's pages",
    )
    parser.add_argument(
        "--write-modes",
        nargs="+",
        default=["proportion", "jpg"],
        choices=["proportion", "smart", "jpg", "raw"],
        help="FFCV storage modes to measure (proportion: FFCV's recipe; jpg: every image decoded, like PyTorch)",
    )
    parser.add_argument(
        "--interpolations",
        nargs="+",
        default=["bicubic", "area"],
        choices=["bicubic", "area"],
        help="data.interpolation of the FFCV loaders (bicubic: as PIL and the recipe; area: FFCV's INTER_AREA)",
    )
    args = parser.parse_args()

    low, high = sorted(args.side_range)
    if low < 16:
        parser.error(f"--side-range {low} {high}: images need at least 16 px a side")
    # One folder (and .beton files) per image set, so that changing the set never reuses stale files.
    set_dir = args.data_dir / f"{args.images}x{low}-{high}px"
    jpegs = generate_jpegs(set_dir / "jpeg", args.images, (low, high))
    files = sorted(jpegs.rglob("*.jpg"))
    mean_kib = np.mean([f.stat().st_size for f in files]) / 1024
    print(
        f"{len(files)} JPEGs of {low}-{high} px a side, {mean_kib:.0f} KiB on average; "
        f"batch {args.batch_size}, {args.workers} workers, FFCV os_cache={args.os_cache}"
    )

    epochs = {}  # loader name -> function of the epoch number giving that epoch's batches
    for mode in args.write_modes:
        beton = convert(jpegs, set_dir / f"train_{mode}.beton", mode, args.workers)
        for interpolation in args.interpolations:
            loader = ffcv_epochs(beton, args.batch_size, args.workers, args.os_cache, interpolation)
            epochs[f"FFCV {interpolation} ({mode})"] = loader
    epochs["PyTorch ImageFolder + PIL"] = pytorch_epochs(jpegs, args.batch_size, args.workers)
    for make_epoch in epochs.values():
        epoch_rate(make_epoch(0))  # warm-up: FFCV compiles its pipeline, PyTorch starts its workers
    # Loaders take turns epoch by epoch, so that a busy moment on a shared machine hits them all alike.
    results = {name: [] for name in epochs}
    for epoch in range(1, args.epochs + 1):
        for name, make_epoch in epochs.items():
            results[name].append(epoch_rate(make_epoch(epoch)))

    baseline = np.mean(results["PyTorch ImageFolder + PIL"])
    print(f"\n{'loader':<32} {'images/s per epoch':<24} {'mean':>8} {'vs PyTorch':>11}")
    for name, rates in results.items():
        per_epoch = ", ".join(f"{rate:.0f}" for rate in rates)
        print(f"{name:<32} {per_epoch:<24} {np.mean(rates):>8.0f} {np.mean(rates) / baseline:>10.1f}x")


if __name__ == "__main__":
    main()

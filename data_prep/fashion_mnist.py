"""Fashion-MNIST (Zalando; 60,000 train + 10,000 test images, 28x28 grayscale, 10 classes) from its IDX files.

Debian ships the real files in the package `dataset-fashion-mnist` (installed by `make setup`), gzipped, in
/usr/share/datasets/fashion-mnist; elsewhere point `--source` at a folder holding the same four files
(gzipped or not), as distributed by github.com/zalandoresearch/fashion-mnist.

IDX format (big-endian): magic 0x00000803 (uint8, 3 dims) then N, rows, cols, then N*rows*cols pixels for
images; magic 0x00000801 then N, then N labels for labels.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from data_prep import DataPrepError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "val": "t10k"}  # our split -> the files' prefix (the official test set is val)
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGES_MAGIC, LABELS_MAGIC = 0x0803, 0x0801


def find_idx(source: Path, stem: str) -> Path:
    """`stem` (e.g. `train-images-idx3-ubyte`), gzipped or not; a clear error naming the package when absent."""
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.is_file():
            return candidate
    raise DataPrepError(
        f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {source}: install the Debian package "
        f"{DEBIAN_PACKAGE} (`sudo apt-get install {DEBIAN_PACKAGE}`, or `make setup`), or pass --source DIR "
        "with the four IDX files of github.com/zalandoresearch/fashion-mnist"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file as a uint8 array of its declared shape; errors name the file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise DataPrepError(f"{path}: cannot be read ({err})") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise DataPrepError(f"{path}: not an IDX file of this kind (magic {magic:08x} expected, found {found})")
    dims = magic & 0xFF
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataPrepError(f"{path}: {len(data)} bytes, but its header {shape} needs {expected} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28, 3) uint8 RGB, labels (N,) int64) of `split` (train | val)."""
    prefix = SPLITS[split]
    images_path = find_idx(source, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(source, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataPrepError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataPrepError(f"{labels_path}: label {labels.max()} is outside the 10 Fashion-MNIST classes")
    # Gray -> RGB by repeating the channel: the pipeline (and every pre-trained ViT) takes 3 channels.
    return np.repeat(images[..., None], 3, axis=-1), labels.astype(np.int64)


def spread(count: int, total: int) -> np.ndarray:
    """`count` positions evenly spaced through 0..total-1 (all of them when count is 0 or too large)."""
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(int)

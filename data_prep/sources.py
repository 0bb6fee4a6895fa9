"""Where images come from: class-per-folder trees, ImageNet-1k in its two val layouts, and the embedded digits.

Labels are class indices in sorted order of the class folder names (for ImageNet: of the synset ids, so
label 0 is n01440764), the same convention as torchvision's ImageFolder.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep import DataPrepError

# Transparent pixels are composited onto white: how the image looks on a page, and never the arbitrary
# colour an encoder left under alpha = 0.
TRANSPARENCY_BACKGROUND = (255, 255, 255, 255)

IMAGENET_LABELS_CSV = "LOC_val_solution.csv"
IMAGENET_SYNSET_NAMES = "LOC_synset_mapping.txt"
# Kaggle's ImageNet download nests the image folders here; the label files sit at its top level.
KAGGLE_IMAGE_ROOT = Path("ILSVRC", "Data", "CLS-LOC")


class Sample(NamedTuple):
    path: str
    label: int


class Probe(NamedTuple):
    """Result of test-decoding one file: its (width, height) when readable, else why not."""

    size: tuple[int, int] | None
    error: str | None


@dataclass
class SourceSet:
    """The files of one split: what to write, and what was set aside before any decoding (with why)."""

    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Decoding one image
# --------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, 16-bit scaled to 8, transparency composited on white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not cost an image whose pixels decode fine
        pass
    if image.mode.startswith("I;16"):
        # PIL's own I;16 -> RGB conversion clips at 255 instead of scaling; keep the high byte.
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        background = Image.new("RGBA", image.size, TRANSPARENCY_BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode a file to a (H, W, 3) uint8 RGB array. Raises on unreadable input (see `probe`)."""
    with warnings.catch_warnings():
        # PIL warns about odd EXIF or metadata chunks; the decode either succeeds or raises.
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            image.load()
            return np.asarray(to_rgb(image), dtype=np.uint8)


def probe(path: str) -> Probe:
    """Fully decode one file the way the writer will, and say whether it can be written.

    The writer's worker processes must never meet an undecodable file (an exception there kills the worker
    and FFCV's writer waits for it forever), so every file is decoded here first, in the same way.
    """
    try:
        if os.path.getsize(path) == 0:
            return Probe(None, "empty file (0 bytes)")
        array = load_rgb(path)
    except UnidentifiedImageError:
        return Probe(None, "not an image (no image format recognises it)")
    except Image.DecompressionBombError as err:
        return Probe(None, f"too many pixels: {err}")
    except Exception as err:  # PIL raises many types on corrupt data; none may stop a conversion
        return Probe(None, f"corrupt or truncated image data ({type(err).__name__}: {err})")
    height, width = array.shape[:2]
    return Probe((width, height), None)


# --------------------------------------------------------------------------------------------------
# Trees of class folders
# --------------------------------------------------------------------------------------------------


def _files_under(directory: Path) -> list[Path]:
    found = []
    for parent, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found.extend(Path(parent, name) for name in sorted(filenames))
    return found


def require_directory(path: Path, what: str) -> None:
    if not path.exists():
        raise DataPrepError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataPrepError(f"{what} {path} is not a directory")


def scan_class_tree(root: Path, classes: list[str] | None = None) -> SourceSet:
    """`root/<class>/**/<file>` -> samples labelled by sorted class name; every file is a candidate.

    With `classes` given (ImageNet val in folder layout), labels follow that list and folders outside it
    are reported, not written. Files directly in `root` belong to no class and are reported too.
    """
    require_directory(root, "source folder")
    entries = sorted(root.iterdir())
    folders = [entry for entry in entries if entry.is_dir()]
    if not folders:
        raise DataPrepError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
    if classes is None:
        classes = [folder.name for folder in folders]
    index = {name: i for i, name in enumerate(classes)}
    source = SourceSet(classes, [])
    source.skipped.extend((str(entry), "not inside a class folder") for entry in entries if not entry.is_dir())
    for folder in folders:
        files = _files_under(folder)
        if folder.name not in index:
            source.skipped.extend((str(path), f"class folder '{folder.name}' is not a known class") for path in files)
            continue
        source.samples.extend(Sample(str(path), index[folder.name]) for path in files)
    if not source.samples:
        raise DataPrepError(f"no files under the class folders of {root}")
    return source


def spread_subset(samples: list[Sample], count: int) -> list[Sample]:
    """`count` samples evenly spaced through the (class-sorted) list, so that every class keeps its share."""
    if count <= 0 or count >= len(samples):
        return samples
    positions = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return [samples[i] for i in positions]


# --------------------------------------------------------------------------------------------------
# ImageNet-1k
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageNetLayout:
    train_dir: Path
    val_dir: Path
    label_dirs: list[Path]  # where LOC_val_solution.csv / LOC_synset_mapping.txt are looked for

    def find(self, name: str) -> Path | None:
        return next((d / name for d in self.label_dirs if (d / name).is_file()), None)


def imagenet_layout(root: Path) -> ImageNetLayout:
    """`root/{train,val}`, or Kaggle's `root/ILSVRC/Data/CLS-LOC/{train,val}` with the CSVs in `root`."""
    require_directory(root, "ImageNet root")
    for image_root in (root, root / KAGGLE_IMAGE_ROOT):
        if (image_root / "train").is_dir() and (image_root / "val").is_dir():
            return ImageNetLayout(image_root / "train", image_root / "val", [root, image_root])
    raise DataPrepError(f"{root} has no train/ and val/ folders (nor {KAGGLE_IMAGE_ROOT}/train and val)")


def synset_names(layout: ImageNetLayout, synsets: list[str]) -> list[str]:
    """Human-readable class names from LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca`); else the ids."""
    mapping_file = layout.find(IMAGENET_SYNSET_NAMES)
    if mapping_file is None:
        return list(synsets)
    names = {}
    for line in mapping_file.read_text().splitlines():
        synset, _, name = line.strip().partition(" ")
        if synset:
            names[synset] = name.strip() or synset
    return [names.get(synset, synset) for synset in synsets]


def imagenet_val(layout: ImageNetLayout, classes: list[str]) -> SourceSet:
    """val/ as synset folders, or as flat files labelled by LOC_val_solution.csv (`ImageId,PredictionString`,
    the prediction string starting with the synset)."""
    val_dir = layout.val_dir
    if any(entry.is_dir() for entry in val_dir.iterdir()):
        return scan_class_tree(val_dir, classes)
    labels_csv = layout.find(IMAGENET_LABELS_CSV)
    if labels_csv is None:
        searched = ", ".join(str(d) for d in layout.label_dirs)
        raise DataPrepError(f"{val_dir} holds flat files but {IMAGENET_LABELS_CSV} was not found in {searched}")
    synset_of = {}
    with labels_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            synset_of[row["ImageId"]] = row["PredictionString"].split()[0]
    index = {name: i for i, name in enumerate(classes)}
    source = SourceSet(classes, [])
    for path in _files_under(val_dir):
        synset = synset_of.get(path.stem)
        if synset is None:
            source.skipped.append((str(path), f"no row for '{path.stem}' in {labels_csv.name}"))
        elif synset not in index:
            source.skipped.append((str(path), f"synset {synset} is not a class folder of train/"))
        else:
            source.samples.append(Sample(str(path), index[synset]))
    if not source.samples:
        raise DataPrepError(f"no labelled files in {val_dir}")
    return source


# --------------------------------------------------------------------------------------------------
# The embedded digits set
# --------------------------------------------------------------------------------------------------


def digits_split(size: int, val_count: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """scikit-learn's 1,797 8x8 digits (bundled, no download) as (N, size, size, 3) uint8 RGB, split into
    ((train_images, train_labels), (val_images, val_labels)), stratified by class and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are ink counts 0..16; bicubic upsampling keeps the strokes smooth instead of 4x4 blocks.
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    upsampled = np.stack(
        [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)) for image in pixels]
    )
    rgb = np.repeat(upsampled[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    train_ids, val_ids = train_test_split(
        np.arange(len(labels)), test_size=val_count, stratify=labels, random_state=seed
    )
    train_ids, val_ids = np.sort(train_ids), np.sort(val_ids)
    return (rgb[train_ids], labels[train_ids]), (rgb[val_ids], labels[val_ids])

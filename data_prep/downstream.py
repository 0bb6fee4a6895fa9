"""The CL-MAE paper's five downstream datasets, split as the reference code (ristea/cl-mae, main_zeroshot.py)
splits them for its k-NN evaluation, with its evaluation transform recorded beside the .beton files.

    name           source layout (SRC)                                      splits written
    svhn           train_32x32.mat, test_32x32.mat                          train = official train, val = official test
    stanford_cars  torchvision's: [stanford_cars/]devkit/cars_train_annos.mat, cars_meta.mat,
                   cars_test_annos_withlabels.mat, cars_train/, cars_test/   train = official train, val = official test
    cub            [CUB_200_2011/]images.txt, image_class_labels.txt,
                   train_test_split.txt, classes.txt, images/                train/val = 90/10 of the official train
                                                                            images (seed 123), test = official test
    mit_indoor     [indoorCVPR_09/]Images/<class>/*                         train/val/test = random_split 13000/2000/620
    food101        [food-101/]images/<class>/*                              train/val = random 90/10

The reference's k-NN uses `train` as the bank and `val` as the queries; `test` (where written) is unused by it.

Outputs in OUTDIR: `<split>.beton` per split, `classes.json` (label -> class), `splits.json` (every split's
images in .beton order: path relative to SRC, or `<file>.mat#<index>` for SVHN, and label; the audit trail),
and `dataset.json` (split rules and counts, and the reference's evaluation transform, which
`clmae.data.build_eval_loader` applies to these files).

Order: each split keeps the reference dataset's own index order (a random_split Subset's order is its
permutation's), so sample i of a .beton is item i of the reference's Dataset object. Class folders are
listed by torchvision's own `ImageFolder` code (sorted classes, sorted files, its image extensions), so the
indices the random splits draw refer to the same files as the reference's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from data_prep import DataPrepError
from data_prep.sources import Sample, SourceSet, require_directory

# The reference's global seed for main_zeroshot.py: args.seed (0) + rank (0), set with torch.manual_seed just
# before its random_split calls (nothing draws from torch's default generator in between).
REFERENCE_GLOBAL_SEED = 0
MIT_INDOOR_SIZES = (13000, 2000, 620)  # random_split(dataset, [13000, 2000, 620]): 15,620 images
FOOD101_TRAIN_FRACTION = 0.9  # train_size = int(0.9 * len(dataset)), val = the rest
CUB_TRAIN_RATIO, CUB_SEED = 0.9, 123  # CUB(root, 'train'|'valid', SPLIT_RATIO=0.9, RANDOM_SEED=123)
CUB_CROP = 224  # CenterCrop(224) without a resize: images smaller than this are padded (see pad_to)

# The reference's evaluation transform per dataset (`mode` as clmae.data.build_eval_loader reads it):
#   center_crop_resize: centre square of crop_ratio x the shorter side, resized to the model's size
#                       (ratio 1: Resize(size) + CenterCrop(size));
#   resize_square:      the whole image resized to size x size (Resize((size, size)), aspect not kept);
#   center_crop:        centre square of crop_pixels source pixels (CenterCrop(crop_pixels), no resize),
#                       resized to the model's size when that differs from crop_pixels.
# normalize: ImageNet mean/std after scaling to [0, 1], or only the scaling (torchvision's ToTensor).
EVAL_TRANSFORMS = {
    "svhn": {
        "mode": "center_crop_resize",
        "crop_ratio": 1.0,
        "normalize": False,
        "reference": "Resize(224) + CenterCrop(224) + ToTensor()",
    },
    "stanford_cars": {
        "mode": "center_crop_resize",
        "crop_ratio": 1.0,
        "normalize": True,
        "reference": "Resize(224) + CenterCrop(224) + ToTensor() + Normalize(ImageNet mean, std)",
    },
    "cub": {
        "mode": "center_crop",
        "crop_pixels": CUB_CROP,
        "normalize": True,
        "reference": "CenterCrop(224) + ToTensor() + Normalize(ImageNet mean, std); no resize",
    },
    "mit_indoor": {
        "mode": "resize_square",
        "normalize": False,
        "reference": "Resize((224, 224)) + RandomHorizontalFlip() + RandomRotation(10) + ColorJitter(0.2, 0.2, "
        "0.2, 0.2) + ToTensor(), applied at evaluation too; only its deterministic part (Resize((224, 224)) + "
        "ToTensor()) is applied here, so that features are a function of the image",
    },
    "food101": {
        "mode": "center_crop_resize",
        "crop_ratio": 1.0,
        "normalize": True,
        "reference": "Resize(224) + CenterCrop(224) + ToTensor() + Normalize(ImageNet mean, std)",
    },
}
INTERPOLATION_NOTE = (
    "the reference resizes with torchvision's default (bilinear, antialiased, on PIL images); these files are "
    "resized by the clmae evaluation loader's own resampling"
)
# Stored resolution (longest side) by default: CUB keeps its originals, since its transform crops 224 source
# pixels without resizing; the others are resized to 224 at evaluation, so FFCV's usual 500 px is plenty.
DEFAULT_MAX_RESOLUTION = {"svhn": None, "stanford_cars": 500, "cub": None, "mit_indoor": 500, "food101": 500}


@dataclass
class Split:
    """One split: files (`samples`, written with write_files) or in-memory images (`images`, SVHN)."""

    rule: str
    samples: list[Sample] = field(default_factory=list)
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    labels: np.ndarray | None = None  # (N,) int64, with `images`
    names: list[str] = field(default_factory=list)  # with `images`: what splits.json lists for each


@dataclass
class Downstream:
    classes: list[str]
    splits: dict[str, Split]
    root: Path  # paths in splits.json are relative to it


# --------------------------------------------------------------------------------------------------
# Small helpers: required files, .mat files, ImageFolder listings, the reference's random splits
# --------------------------------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataPrepError(f"{what}: {path} not found")
    return path


def load_mat(path: Path, keys: tuple[str, ...], **kwargs) -> dict:
    """A MATLAB file's variables `keys`; errors name the file and the missing key."""
    import scipy.io

    try:
        content = scipy.io.loadmat(path, **kwargs)
    except Exception as err:  # scipy raises ValueError, MatReadError, OSError... on a damaged file
        raise DataPrepError(f"{path}: not a readable MATLAB .mat file ({type(err).__name__}: {err})") from None
    missing = [key for key in keys if key not in content]
    if missing:
        raise DataPrepError(f"{path}: has no variable {', '.join(repr(k) for k in missing)}")
    return content


def first_dir(root: Path, candidates: tuple[str, ...], marker: str) -> Path:
    """`root` itself when it holds `marker`, else the first `root/<candidate>` that does."""
    require_directory(root, "dataset folder")
    for base in (root, *(root / name for name in candidates)):
        if (base / marker).exists():
            return base
    raise DataPrepError(f"{root}: no {marker} in it (nor in {', '.join(str(root / c) for c in candidates)})")


def image_folder(root: Path) -> tuple[list[str], list[Sample]]:
    """torchvision ImageFolder(root)'s classes and (path, label) list, by torchvision's own code."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(root))
        listed = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise DataPrepError(f"{root}: {err}") from None
    return classes, [Sample(path, label) for path, label in listed]


def reference_random_split(samples: list[Sample], lengths: tuple[int, ...]) -> list[list[Sample]]:
    """torch.utils.data.random_split(samples, lengths) right after torch.manual_seed(0), as the reference.

    A fresh CPU generator seeded with 0 gives the same stream as the default generator after
    torch.manual_seed(0), without touching the caller's global state."""
    import torch
    from torch.utils.data import random_split

    generator = torch.Generator().manual_seed(REFERENCE_GLOBAL_SEED)
    subsets = random_split(range(len(samples)), list(lengths), generator=generator)
    return [[samples[i] for i in subset] for subset in subsets]


# --------------------------------------------------------------------------------------------------
# The five datasets
# --------------------------------------------------------------------------------------------------


def svhn(src: Path, _: argparse.Namespace) -> Downstream:
    """torchvision.datasets.SVHN: X (32, 32, 3, N) uint8, y (N, 1) with label 10 meaning digit 0."""
    root = first_dir(src, ("svhn", "SVHN"), "train_32x32.mat")
    splits = {}
    for split, filename, rule in (
        ("train", "train_32x32.mat", "official train set (train_32x32.mat), file order"),
        ("val", "test_32x32.mat", "official test set (test_32x32.mat), file order"),
    ):
        path = require_file(root / filename, f"SVHN {split}")
        content = load_mat(path, ("X", "y"))
        images, labels = content["X"], np.asarray(content["y"]).astype(np.int64).reshape(-1)
        if images.ndim != 4 or images.shape[2] != 3 or images.shape[3] != len(labels) or images.dtype != np.uint8:
            raise DataPrepError(
                f"{path}: X must be uint8 (32, 32, 3, N) with N = len(y) = {len(labels)}, got "
                f"{images.dtype} {images.shape}"
            )
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise DataPrepError(f"{path}: labels {labels.min()}..{labels.max()}, expected 1..10 (10 = digit 0)")
        labels[labels == 10] = 0
        splits[split] = Split(
            rule,
            images=np.ascontiguousarray(images.transpose(3, 0, 1, 2)),
            labels=labels,
            names=[f"{filename}#{i}" for i in range(len(labels))],
        )
    return Downstream([str(d) for d in range(10)], splits, root)


def stanford_cars(src: Path, _: argparse.Namespace) -> Downstream:
    """torchvision.datasets.StanfordCars' layout and reading: annotations' fname and class (1-based)."""
    base = first_dir(src, ("stanford_cars",), "devkit")
    devkit = base / "devkit"
    meta_file = require_file(devkit / "cars_meta.mat", "Stanford Cars class names")
    meta = load_mat(meta_file, ("class_names",), squeeze_me=True)
    classes = [str(name) for name in np.atleast_1d(meta["class_names"])]
    test_annos = base / "cars_test_annos_withlabels.mat"
    if not test_annos.is_file() and (devkit / test_annos.name).is_file():
        test_annos = devkit / test_annos.name  # some copies keep it inside devkit/
    splits = {}
    for split, annos, folder, rule in (
        ("train", devkit / "cars_train_annos.mat", "cars_train", "official train set (devkit cars_train_annos.mat)"),
        ("val", test_annos, "cars_test", "official test set (cars_test_annos_withlabels.mat)"),
    ):
        require_file(annos, f"Stanford Cars {split} annotations")
        require_directory(base / folder, f"Stanford Cars {split} images")
        records = np.atleast_1d(load_mat(annos, ("annotations",), squeeze_me=True)["annotations"])
        if records.dtype.names is None or not {"fname", "class"} <= set(records.dtype.names):
            raise DataPrepError(f"{annos}: 'annotations' has no 'fname' and 'class' fields")
        samples = []
        for record in records:
            label = int(record["class"]) - 1
            if not 0 <= label < len(classes):
                raise DataPrepError(f"{annos}: class {label + 1} of {record['fname']} is outside 1..{len(classes)}")
            samples.append(Sample(str(base / folder / str(record["fname"])), label))
        splits[split] = Split(rule, samples)
    return Downstream(classes, splits, base)


def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """`<id> <value>...` lines (CUB's .txt files) -> {id: values}; errors name the file and line."""
    rows = {}
    for number, line in enumerate(require_file(path, "CUB-200-2011 file").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns or not parts[0].isdigit():
            raise DataPrepError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
        rows[int(parts[0])] = parts[1:]
    return rows


def cub_split_positions(count: int) -> tuple[list[int], list[int]]:
    """The reference's 'train' / 'valid' positions among `count` official training images:
    np.random.seed(123); np.random.shuffle(list(range(count))); train = the first int(count * 0.9) + 1."""
    rng = np.random.RandomState(CUB_SEED)  # the legacy global generator's algorithm, without touching it
    indices = list(range(count))
    rng.shuffle(indices)
    split_at = int(count * CUB_TRAIN_RATIO) + 1
    return indices[:split_at], indices[split_at:]


def cub(src: Path, _: argparse.Namespace) -> Downstream:
    """CUB-200-2011: images.txt, image_class_labels.txt (1-based), train_test_split.txt, classes.txt."""
    root = first_dir(src, ("CUB_200_2011",), "images.txt")
    paths, labels = _read_table(root / "images.txt", 2), _read_table(root / "image_class_labels.txt", 2)
    is_train, names = _read_table(root / "train_test_split.txt", 2), _read_table(root / "classes.txt", 2)
    require_directory(root / "images", "CUB-200-2011 images")
    classes = [names[i][0] for i in sorted(names)]
    samples: dict[str, list[Sample]] = {"train": [], "test": []}
    for image_id in sorted(paths):  # the reference's DataFrame is in images.txt's id order
        for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise DataPrepError(f"{root / file}: no row for image id {image_id} of images.txt")
        label = int(labels[image_id][0]) - 1
        if not 0 <= label < len(classes):
            raise DataPrepError(f"{root / 'image_class_labels.txt'}: class {label + 1} is outside classes.txt")
        samples["train" if is_train[image_id][0] == "1" else "test"].append(
            Sample(str(root / "images" / paths[image_id][0]), label)
        )
    train_positions, val_positions = cub_split_positions(len(samples["train"]))
    official_train = samples["train"]
    rule = "of the official training images (train_test_split.txt = 1, images.txt order): np.random.seed(123), "
    splits = {
        "train": Split(rule + "shuffle, the first int(0.9 n) + 1", [official_train[i] for i in train_positions]),
        "val": Split(rule + "shuffle, the rest", [official_train[i] for i in val_positions]),
        "test": Split("official test images (train_test_split.txt = 0), images.txt order", samples["test"]),
    }
    return Downstream(classes, splits, root)


def mit_indoor(src: Path, args: argparse.Namespace) -> Downstream:
    """ImageFolder(Images/), random_split(dataset, [13000, 2000, 620]) under the global seed 0."""
    root = src / "Images" if (src / "Images").is_dir() else src
    require_directory(root, "MIT Indoor-67 Images folder")
    classes, samples = image_folder(root)
    sizes = tuple(args.split_sizes) if args.split_sizes else MIT_INDOOR_SIZES
    if sum(sizes) != len(samples):
        hint = " (pass --split-sizes to split a different copy)" if not args.split_sizes else ""
        raise DataPrepError(
            f"{root}: {len(samples)} images, but the split {'/'.join(map(str, sizes))} needs {sum(sizes)}{hint}; "
            "the reference's split is defined for the 15,620 images of MIT Indoor-67's Images/ folder"
        )
    rule = f"ImageFolder order, torch.manual_seed(0), random_split(dataset, {list(sizes)}): "
    parts = reference_random_split(samples, sizes)
    names = ("train", "val", "test")
    splits = {name: Split(rule + f"subset {i}", part) for i, (name, part) in enumerate(zip(names, parts, strict=True))}
    return Downstream(classes, splits, root)


def food101(src: Path, _: argparse.Namespace) -> Downstream:
    """ImageFolder(images/), random_split(dataset, [int(0.9 n), n - int(0.9 n)]) under the global seed 0."""
    root = src / "images" if (src / "images").is_dir() else src
    require_directory(root, "Food-101 images")
    classes, samples = image_folder(root)
    train_size = int(FOOD101_TRAIN_FRACTION * len(samples))
    sizes = (train_size, len(samples) - train_size)
    rule = f"ImageFolder order, torch.manual_seed(0), random_split(dataset, {list(sizes)}): "
    train, val = reference_random_split(samples, sizes)
    return Downstream(classes, {"train": Split(rule + "subset 0", train), "val": Split(rule + "subset 1", val)}, root)


DATASETS = {"svhn": svhn, "stanford_cars": stanford_cars, "cub": cub, "mit_indoor": mit_indoor, "food101": food101}


# --------------------------------------------------------------------------------------------------
# Command line and writing
# --------------------------------------------------------------------------------------------------


def add_downstream_parser(sub, parser_kwargs: dict, add_writer_options) -> None:
    parser = sub.add_parser(
        "downstream",
        **parser_kwargs,
        help="the paper's downstream sets (svhn, stanford_cars, cub, mit_indoor, food101), split as the reference",
        description=__doc__.split("\n\n")[0] + " See the README's 'Downstream datasets' for the layouts. "
        "--max-resolution -1 (default): the dataset's own (CUB: original size, required; SVHN: raw 32x32; the others "
        "500). --subset N: N images of each split after splitting, evenly spread (a quick trial of the layout).",
    )
    parser.add_argument("name", choices=sorted(DATASETS), metavar="NAME", help=", ".join(DATASETS))
    parser.add_argument("src", type=Path, metavar="SRC", help="the dataset as distributed (see the README)")
    parser.add_argument("outdir", type=Path, metavar="OUTDIR")
    add_writer_options(parser)
    parser.set_defaults(max_resolution=-1, run=run_downstream)  # -1: the dataset's default (see --help)
    parser.add_argument(
        "--split-sizes",
        type=int,
        nargs=3,
        default=None,
        metavar=("TRAIN", "VAL", "TEST"),
        help="mit_indoor only: other sizes than the reference's 13000 2000 620 (for a copy that does not hold "
        "the 15,620 images; the split is then not the reference's)",
    )


def _write_options(args: argparse.Namespace):
    from data_prep.outputs import WriteOptions

    max_resolution = DEFAULT_MAX_RESOLUTION[args.name] if args.max_resolution < 0 else args.max_resolution or None
    if args.name == "cub" and max_resolution is not None:
        raise DataPrepError(
            "cub: --max-resolution must be 0: its evaluation crops 224 source pixels without resizing, so the "
            "images are stored at their original size"
        )
    return WriteOptions(
        max_resolution=max_resolution,
        write_mode=args.write_mode,
        compress_probability=args.compress_probability,
        jpeg_quality=args.jpeg_quality,
        smart_threshold=args.smart_threshold,
        workers=args.workers,
        chunk_size=args.chunk_size,
        pad_to=CUB_CROP if args.name == "cub" else None,
    )


def _spread(count: int, total: int) -> np.ndarray:
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(int)


def run_downstream(args: argparse.Namespace) -> int:
    from data_prep.outputs import check_output, write_class_index, write_json

    if args.split_sizes and args.name != "mit_indoor":
        raise DataPrepError(f"--split-sizes is for mit_indoor only (the {args.name} split is fixed)")
    options = _write_options(args)
    dataset = DATASETS[args.name](args.src, args)
    outputs = {split: args.outdir / f"{split}.beton" for split in dataset.splits}
    for out in outputs.values():
        check_output(out, args.overwrite)
    from data_prep.writer import write_arrays, write_files

    listing, summary = {}, {}
    for split, part in dataset.splits.items():
        if part.images is not None:
            keep = _spread(args.subset, len(part.labels))
            raw = replace(options, write_mode="raw", max_resolution=None)
            result = write_arrays(part.images[keep], part.labels[keep], outputs[split], raw, args.overwrite)
            entries = [(part.names[i], int(part.labels[i])) for i in keep]
        else:
            samples = [part.samples[i] for i in _spread(args.subset, len(part.samples))]
            result = write_files(SourceSet(dataset.classes, samples), outputs[split], options, args.overwrite)
            left_out = {path for path, _ in result.skipped}
            entries = [
                (str(Path(s.path).relative_to(dataset.root)), s.label) for s in samples if s.path not in left_out
            ]
        print(result.summary())
        listing[split] = [{"path": path, "label": label} for path, label in entries]
        summary[split] = {
            "file": outputs[split].name,
            "count": result.written,
            "skipped": len(result.skipped),
            "rule": part.rule,
        }
    write_class_index(args.outdir / "classes.json", dataset.classes, dataset.classes)
    write_json(args.outdir / "splits.json", listing)
    subset_note = {"subset_per_split": args.subset} if args.subset > 0 else {}
    write_json(
        args.outdir / "dataset.json",
        {
            "name": args.name,
            "source": str(dataset.root.resolve()),
            "num_classes": len(dataset.classes),
            "splits": summary,
            **subset_note,
            "knn": "the reference's k-NN: train as the bank, val as the queries",
            "eval_transform": EVAL_TRANSFORMS[args.name],
            "interpolation": INTERPOLATION_NOTE,
            "stored": {
                "max_resolution": options.max_resolution,
                "write_mode": options.write_mode,
                "padded_to": options.pad_to,
            },
        },
    )
    counts = ", ".join(f"{split} {entry['count']}" for split, entry in summary.items())
    print(f"{args.outdir}: {counts} images; classes.json, splits.json, dataset.json")
    return 0

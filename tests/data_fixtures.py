"""Image sets for the data tests: a class tree with every kind of awkward file, and tiny ImageNet layouts.

Every good image is a solid colour (or two known halves), so that what comes out of a .beton can be
checked pixel by pixel.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE, GREEN, WHITE = (200, 30, 30), (30, 30, 200), (0, 160, 0), (255, 255, 255)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF orientation: "rotate 90 degrees clockwise to display"

# Relative path -> (label, colour of every pixel, or None where the test checks halves). Sorted by path,
# which is the order the converter writes them in.
GOOD_IMAGES = {
    "apples/cmyk.jpg": (0, (255, 0, 0)),
    "apples/gray.jpg": (0, (128, 128, 128)),
    "apples/red.jpg": (0, RED),
    "apples/rotated.jpg": (0, None),
    "pears/blue.png": (1, BLUE),
    "pears/palette.png": (1, GREEN),
    "pears/rgba.png": (1, None),
}
BAD_IMAGES = {
    "apples/corrupt.jpg": "corrupt",
    "apples/empty.jpg": "empty",
    "pears/notes.txt": "not an image",
    "pears/truncated.jpg": "truncated",
}


def _jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **save_args)
    return buffer.getvalue()


def make_image_tree(root: Path) -> Path:
    """root/apples and root/pears with GOOD_IMAGES and BAD_IMAGES; returns root."""
    for folder in ("apples", "pears"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    size = (32, 24)
    Image.new("RGB", size, RED).save(root / "apples/red.jpg", quality=95)
    Image.new("L", size, 128).save(root / "apples/gray.jpg", quality=95)
    Image.new("CMYK", size, (0, 255, 255, 0)).save(root / "apples/cmyk.jpg", quality=95)
    # Stored 40 wide x 20 high, red left half, blue right half; displayed rotated 90 degrees clockwise,
    # i.e. 20 wide x 40 high with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    Image.fromarray(stored).save(root / "apples/rotated.jpg", quality=95, exif=exif)
    Image.new("RGB", size, BLUE).save(root / "pears/blue.png")
    Image.new("RGB", size, GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
        root / "pears/palette.png"
    )
    # Left half fully transparent (its RGB must not leak through), right half opaque green.
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[:, :16] = (0, 0, 255, 0)
    rgba[:, 16:] = (*GREEN, 255)
    Image.fromarray(rgba, "RGBA").save(root / "pears/rgba.png")

    jpeg = _jpeg_bytes(Image.new("RGB", (64, 48), RED))
    rng = np.random.default_rng(0)
    (root / "apples/corrupt.jpg").write_bytes(jpeg[:2] + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    (root / "apples/empty.jpg").write_bytes(b"")
    (root / "pears/notes.txt").write_text("not an image\n")
    (root / "pears/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


def make_imagenet(root: Path, kaggle: bool) -> dict[str, list[str]]:
    """A 3-class ImageNet in one of its two layouts; returns {split: [synset of each good image, sorted]}.

    kaggle=True: root/ILSVRC/Data/CLS-LOC/{train,val} with val flat, labelled by root/LOC_val_solution.csv,
    names in root/LOC_synset_mapping.txt; one val file has no CSV row. kaggle=False: root/{train,val} with
    val in synset folders, no name mapping.
    """
    synsets = ["n01440764", "n01443537", "n01484850"]
    images = root / "ILSVRC/Data/CLS-LOC" if kaggle else root
    expected: dict[str, list[str]] = {"train": [], "val": []}
    for label, synset in enumerate(synsets):
        (images / "train" / synset).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 16), (40 * label, 10 * i, 90)).save(images / "train" / synset / f"{synset}_{i}.JPEG")
            expected["train"].append(synset)
    (images / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for i, synset in enumerate(reversed(synsets)):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        folder = images / "val" if kaggle else images / "val" / synset
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (18, 14), (10, 40 * i, 90)).save(folder / f"{name}.JPEG")
        rows.append(f"{name},{synset} 1 2 3 4 {synset} 5 6 7 8")
    expected["val"] = sorted(synsets) if not kaggle else list(reversed(synsets))
    if kaggle:
        Image.new("RGB", (18, 14)).save(images / "val" / "ILSVRC2012_val_00000099.JPEG")  # no CSV row
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
        (root / "LOC_synset_mapping.txt").write_text(
            "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n"
        )
    return expected


# --------------------------------------------------------------------------------------------------
# Small copies of the downstream datasets' on-disk layouts (clmae-prep downstream), real file formats
# --------------------------------------------------------------------------------------------------


def numbered_image(number: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    """A solid image whose red channel is `number` (< 256): which file landed where can be read back."""
    return Image.new("RGB", size, (number, 100, 200))


def make_svhn(root: Path, counts: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train_32x32.mat / test_32x32.mat as SVHN ships them: X (32, 32, 3, N) uint8, y (N, 1) in 1..10
    (10 = digit 0). Returns {file: (X, y)}."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, count in counts.items():
        images = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        labels = (np.arange(count) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # every class, 10 included
        savemat(root / name, {"X": images, "y": labels})
        written[name] = (images, labels)
    return written


def _struct_array(rows: list[dict]) -> np.ndarray:
    """A MATLAB struct array (1 x N) for scipy.io.savemat, as the Stanford Cars devkit's annotations."""
    fields = list(rows[0])
    array = np.empty(len(rows), dtype=[(name, object) for name in fields])
    for i, row in enumerate(rows):
        array[i] = tuple(row[name] for name in fields)
    return array


def make_stanford_cars(root: Path, classes: int, per_class: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """root/stanford_cars/ as torchvision's StanfordCars reads it; returns {split: [(fname, 0-based label)]}."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit/cars_meta.mat", {"class_names": np.array([f"Car {c}" for c in range(classes)], object)})
    expected = {}
    for split, folder, annos in (
        ("train", "cars_train", base / "devkit/cars_train_annos.mat"),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        (base / folder).mkdir(exist_ok=True)
        rows, number = [], 0
        for image_class in [c for c in range(classes) for _ in range(per_class[split])][::-1]:  # not sorted
            number += 1
            fname = f"{number:05d}.jpg"
            numbered_image(number).save(base / folder / fname, quality=95)
            rows.append(
                {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 10, "class": image_class + 1, "fname": fname}
            )
        savemat(annos, {"annotations": _struct_array(rows)})
        expected[split] = [(row["fname"], row["class"] - 1) for row in rows]
    return expected


def make_cub(root: Path, classes: int, per_class: int, small: tuple[int, int] = (150, 200)) -> Path:
    """root/CUB_200_2011 with images.txt, image_class_labels.txt (1-based), train_test_split.txt (every
    other image in train), classes.txt, images/<class>/<file>. The first image is `small` (width, height),
    smaller than the 224 crop; the others 240 x 230. Returns the CUB_200_2011 folder."""
    cub = root / "CUB_200_2011"
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    image_id = 0
    for c in range(classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        (cub / "images" / folder).mkdir(parents=True, exist_ok=True)
        lines["classes.txt"].append(f"{c + 1} {folder}")
        for i in range(per_class):
            image_id += 1
            path = f"{folder}/Bird_{c}_{i:04d}.jpg"
            numbered_image(image_id, small if image_id == 1 else (240, 230)).save(cub / "images" / path, quality=95)
            lines["images.txt"].append(f"{image_id} {path}")
            lines["image_class_labels.txt"].append(f"{image_id} {c + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {image_id % 2}")
    for name, content in lines.items():
        (cub / name).write_text("\n".join(content) + "\n")
    return cub


def make_class_folders(root: Path, per_class: dict[str, int]) -> Path:
    """root/<class>/<n>.jpg (an ImageFolder tree, as MIT Indoor's Images/ and Food-101's images/)."""
    number = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            number += 1
            numbered_image(number).save(root / name / f"{i:03d}.jpg", quality=95)
    return root

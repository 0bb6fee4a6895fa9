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

"""Checking a .beton file without training on it: structure, counts, and decoding samples.

Images are read straight from the file (FFCV's Reader for the header, metadata and allocation table;
OpenCV for the stored JPEG bytes), not through a compiled FFCV Loader: a check must not spend seconds of
JIT compilation, and must not touch memory outside the file when its tables point past a truncated end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import BrokenDatasetError, DataPrepError

EXPECTED_FIELDS = ("image", "label")
JPEG_MODE, RAW_MODE = 0, 1  # FFCV's RGBImageField storage modes
# FFCV's per-sample metadata is a structured array with unnamed fields, which numpy calls f0, f1, ...
IMAGE_METADATA, LABEL_METADATA = "f0", "f1"


@dataclass
class BetonSummary:
    path: Path
    num_samples: int
    num_classes: int
    label_range: tuple[int, int]
    width_range: tuple[int, int]
    height_range: tuple[int, int]
    jpeg_count: int
    decoded: list[int]

    def lines(self) -> list[str]:
        return [
            f"{self.path}: OK",
            f"  samples  {self.num_samples}",
            f"  classes  {self.num_classes} (labels {self.label_range[0]}..{self.label_range[1]})",
            f"  width    {self.width_range[0]}..{self.width_range[1]} px, height "
            f"{self.height_range[0]}..{self.height_range[1]} px",
            f"  stored   {self.jpeg_count} JPEG, {self.num_samples - self.jpeg_count} raw",
            f"  decoded  {len(self.decoded)} sample(s): {_short_list(self.decoded)}",
        ]


def _short_list(items: list[int], limit: int = 8) -> str:
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class BetonFile:
    """Read access to an (image, label) .beton that raises BrokenDatasetError on any inconsistency."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataPrepError(f"{self.path} does not exist")
        from clmae.ffcv_import import import_ffcv

        import_ffcv()
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader
        from ffcv.types import ALLOC_TABLE_TYPE

        size = self.path.stat().st_size
        try:
            reader = Reader(str(self.path))
        except (AssertionError, IndexError, KeyError, OSError, ValueError) as err:
            # FFCV reads header, fields, metadata and allocation table with np.fromfile; a cut file
            # fails there with IndexError/ValueError, an unknown version with AssertionError.
            raise BrokenDatasetError(f"{self.path} is not a readable .beton file (truncated?): {err}") from None
        names = tuple(reader.field_names)
        kinds = [type(handler) for handler in reader.handlers.values()]
        if names != EXPECTED_FIELDS or kinds != [RGBImageField, IntField]:
            raise BrokenDatasetError(f"{self.path} has fields {names}, expected image (RGB) and label (int)")
        self.num_samples = int(reader.num_samples)
        self.metadata = reader.metadata
        if len(self.metadata) != self.num_samples:
            raise BrokenDatasetError(
                f"{self.path} is truncated: metadata for {len(self.metadata)} of {self.num_samples} samples"
            )
        table_start = int(reader.header["alloc_table_ptr"])
        table_bytes = size - table_start
        if table_bytes % ALLOC_TABLE_TYPE.itemsize:
            raise BrokenDatasetError(f"{self.path} is truncated: its allocation table ends mid-entry")
        table = np.sort(reader.alloc_table, order="ptr")
        image_ptrs = np.asarray(self.metadata[IMAGE_METADATA]["data_ptr"], dtype=np.uint64)
        found = np.searchsorted(table["ptr"], image_ptrs)
        in_table = found < len(table)
        in_table[in_table] = table["ptr"][found[in_table]] == image_ptrs[in_table]
        if not in_table.all():
            raise BrokenDatasetError(
                f"{self.path} is truncated: {int((~in_table).sum())} of {self.num_samples} images have no "
                "allocation table entry"
            )
        self.sizes = table["size"][found]
        if int((image_ptrs + self.sizes).max(initial=0)) > table_start:
            raise BrokenDatasetError(f"{self.path} is inconsistent: image data extends into the allocation table")

    @property
    def images(self) -> np.ndarray:
        return self.metadata[IMAGE_METADATA]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.metadata[LABEL_METADATA])

    def read_image(self, index: int) -> np.ndarray:
        """Sample `index` as stored (after the writer's resize), (H, W, 3) uint8 RGB."""
        import cv2

        meta = self.images[index]
        height, width = int(meta["height"]), int(meta["width"])
        stored = np.fromfile(self.path, dtype=np.uint8, count=int(self.sizes[index]), offset=int(meta["data_ptr"]))
        if meta["mode"] == RAW_MODE:
            if stored.size != height * width * 3:
                raise BrokenDatasetError(f"{self.path}: sample {index} has {stored.size} bytes for {width}x{height}")
            return stored.reshape(height, width, 3)
        decoded = cv2.imdecode(stored, cv2.IMREAD_COLOR) if stored.size else None
        if decoded is None or decoded.shape != (height, width, 3):
            raise BrokenDatasetError(f"{self.path}: sample {index} does not decode as a {width}x{height} JPEG")
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def verify(path: str | os.PathLike, decode_all: bool = False) -> BetonSummary:
    """Structure and counts of a .beton, and a decode of its first, middle and last sample (or of all)."""
    beton = BetonFile(path)
    if beton.num_samples == 0:
        raise BrokenDatasetError(f"{beton.path} holds no samples")
    count = beton.num_samples
    to_decode = list(range(count)) if decode_all else sorted({0, count // 2, count - 1})
    for index in to_decode:
        beton.read_image(index)
    labels, images = beton.labels, beton.images
    return BetonSummary(
        path=beton.path,
        num_samples=count,
        num_classes=len(np.unique(labels)),
        label_range=(int(labels.min()), int(labels.max())),
        width_range=(int(images["width"].min()), int(images["width"].max())),
        height_range=(int(images["height"].min()), int(images["height"].max())),
        jpeg_count=int((images["mode"] == JPEG_MODE).sum()),
        decoded=to_decode,
    )

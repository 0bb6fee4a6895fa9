"""Output settings and paths, and the small files written beside a .beton (skip report, class index).

Kept free of heavy imports so that the command line can refuse a bad output path before loading FFCV.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import DataPrepError

WRITE_MODES = ("proportion", "smart", "jpg", "raw")


def available_cpus() -> int:
    """Cores this process may run on: a SLURM or cgroup allocation, not the whole node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored (FFCV's ImageNet recipe: proportion, 500 px, half JPEG at quality 90)."""

    max_resolution: int | None = 500  # longest side after resizing (INTER_AREA); None keeps full size
    write_mode: str = "proportion"  # proportion | smart | jpg | raw
    compress_probability: float = 0.5  # proportion: fraction of images stored as JPEG, the rest raw
    jpeg_quality: int = 90
    smart_threshold: int = 256 * 256 * 3  # smart: JPEG when the raw pixels take more bytes than this
    workers: int = field(default_factory=available_cpus)
    chunk_size: int = 100  # samples per task handed to a worker
    # Zero-pad images smaller than this in a side to it, centred as torchvision's CenterCrop(pad_to) pads
    # them, so that an evaluation centre crop of pad_to pixels equals CenterCrop(pad_to) (CUB); None: never.
    pad_to: int | None = None

    def __post_init__(self) -> None:
        checks = {
            f"write_mode must be one of {', '.join(WRITE_MODES)}": self.write_mode in WRITE_MODES,
            "max_resolution must be positive (or None)": self.max_resolution is None or self.max_resolution >= 1,
            "compress_probability must be in [0, 1]": 0.0 <= self.compress_probability <= 1.0,
            "jpeg_quality must be in [1, 100]": 1 <= self.jpeg_quality <= 100,
            "workers and chunk_size must be >= 1": min(self.workers, self.chunk_size) >= 1,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise DataPrepError("; ".join(failed))


def partial_path(out: Path) -> Path:
    """Where `out` is written until complete (a killed conversion never leaves a file that looks done)."""
    return out.with_name(out.name + ".partial")


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".skipped.json")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to; create the parent folder."""
    if out.is_dir():
        raise DataPrepError(f"{out} is a directory, not a .beton file path")
    if out.exists() and not overwrite:
        raise DataPrepError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, content) -> Path:
    from clmae.files import write_atomic

    return write_atomic(path, json.dumps(content, indent=1) + "\n")


def write_skip_report(out: Path, written: int, skipped: list[tuple[str, str]]) -> Path:
    """`OUT.skipped.json`: every source file left out of `out`, with the reason."""
    content = {"output": str(out), "written": written, "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    return write_json(report_path(out), content)


def write_class_index(path: Path, keys: list[str], names: list[str]) -> Path:
    """`{key: {"index": i, "name": name}}` in label order; key is the class folder name / synset id."""
    index = {key: {"index": i, "name": name} for i, (key, name) in enumerate(zip(keys, names, strict=True))}
    return write_json(path, index)

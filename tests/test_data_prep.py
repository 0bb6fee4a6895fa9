"""data_prep: conversion of awkward image trees, ImageNet layouts and the digits set to .beton, and verify."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import DataPrepError
from data_prep.cli import main
from data_prep.outputs import WriteOptions
from data_prep.sources import Sample, digits_split, scan_class_tree, spread_subset
from data_prep.verify import BetonFile
from tests.data_fixtures import BAD_IMAGES, BLUE, GOOD_IMAGES, GREEN, RED, WHITE, make_image_tree, make_imagenet

REPO = Path(__file__).resolve().parents[1]
JPEG_TOLERANCE = 8  # per channel, quality 95 solid colours


def run_prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def run_main(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("tree") / "src")


@pytest.fixture(scope="module")
def converted(image_tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tree converted end to end through the real command line, pixels stored exactly (raw)."""
    out = tmp_path_factory.mktemp("out") / "tree.beton"
    result = run_prep("imagefolder", image_tree, out, "--write-mode", "raw", "--max-resolution", "0", "--workers", "2")
    return out, result


def assert_colour(pixels: np.ndarray, colour, tolerance: int = JPEG_TOLERANCE) -> None:
    difference = np.abs(pixels.reshape(-1, 3).astype(int) - np.array(colour)).max()
    assert difference <= tolerance, f"pixels differ from {colour} by up to {difference}"


def test_imagefolder_writes_every_good_image_and_reports_every_bad_one(converted, image_tree):
    out, result = converted
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{out}: wrote 7 images, skipped 4 (listed in {out}.skipped.json)"
    assert not Path(f"{out}.partial").exists()

    report = json.loads(Path(f"{out}.skipped.json").read_text())
    reasons = {str(Path(item["path"]).relative_to(image_tree)): item["reason"] for item in report["skipped"]}
    assert report["written"] == 7
    assert sorted(reasons) == sorted(BAD_IMAGES)
    assert "empty" in reasons["apples/empty.jpg"]
    assert "not an image" in reasons["pears/notes.txt"]
    assert "truncated" in reasons["pears/truncated.jpg"].lower()
    classes = json.loads(Path(f"{out}.classes.json").read_text())
    assert classes == {"apples": {"index": 0, "name": "apples"}, "pears": {"index": 1, "name": "pears"}}

    beton = BetonFile(out)
    assert beton.num_samples == len(GOOD_IMAGES)
    assert beton.labels.tolist() == [label for label, _ in GOOD_IMAGES.values()]
    assert (beton.images["mode"] == 1).all()  # raw, as asked
    images = {name: beton.read_image(i) for i, name in enumerate(GOOD_IMAGES)}
    for name, (_, colour) in GOOD_IMAGES.items():
        if colour is not None:
            assert_colour(images[name], colour)
    # EXIF orientation applied: stored 40x20 red|blue, displayed (and written) 20x40 red over blue.
    rotated = images["apples/rotated.jpg"]
    assert rotated.shape == (40, 20, 3)
    assert_colour(rotated[2:18], RED)
    assert_colour(rotated[22:38], BLUE)
    # Transparent half composited onto white, not the blue hidden under alpha 0.
    rgba = images["pears/rgba.png"]
    assert_colour(rgba[:, :16], WHITE, tolerance=0)
    assert_colour(rgba[:, 16:], GREEN, tolerance=0)


def test_jpeg_mode_resizes_to_max_resolution(image_tree, tmp_path):
    from data_prep.writer import write_files

    out = tmp_path / "small.beton"
    options = WriteOptions(max_resolution=16, write_mode="jpg", jpeg_quality=95, workers=2)
    result = write_files(scan_class_tree(image_tree), out, options)
    assert (result.written, len(result.skipped)) == (7, 4)
    beton = BetonFile(out)
    assert (beton.images["mode"] == 0).all()
    assert max(beton.images["width"].max(), beton.images["height"].max()) == 16
    red = beton.read_image(list(GOOD_IMAGES).index("apples/red.jpg"))
    assert red.shape == (12, 16, 3)  # 32x24 shrunk to a longest side of 16
    assert_colour(red, RED)


def test_user_errors_are_one_line_and_nonzero(image_tree, converted, tmp_path):
    out, _ = converted
    before = out.stat().st_mtime_ns
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "image.jpg").write_bytes(b"")
    (tmp_path / "empty_tree" / "cls").mkdir(parents=True)
    cases = {
        "does not exist": ("imagefolder", tmp_path / "missing", tmp_path / "a.beton"),
        "already exists; pass --overwrite": ("imagefolder", image_tree, out),
        "no class subfolders": ("imagefolder", tmp_path / "flat", tmp_path / "b.beton"),
        "no files under the class folders": ("imagefolder", tmp_path / "empty_tree", tmp_path / "c.beton"),
    }
    for expected, args in cases.items():
        result = run_prep(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert out.stat().st_mtime_ns == before
    assert not list(tmp_path.glob("*.beton*"))


def test_verify_passes_on_a_good_file_and_fails_on_truncated_copies(converted, tmp_path, capsys):
    out, _ = converted
    assert run_main("verify", out, "--decode-all") == 0
    printed = capsys.readouterr().out
    assert "samples  7" in printed and "classes  2 (labels 0..1)" in printed

    size = out.stat().st_size
    cut_in_data, cut_in_table = tmp_path / "cut_in_data.beton", tmp_path / "cut_in_table.beton"
    for path, length in ((cut_in_data, size // 2), (cut_in_table, size - 30)):
        shutil.copy(out, path)
        os.truncate(path, length)
    for path in (cut_in_data, cut_in_table):
        assert run_main("verify", path) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: {path} ") and "truncated" in error and error.count("\n") == 1


def test_digits_gives_1797_images_in_10_classes(tmp_path, capsys):
    assert run_main("digits", tmp_path, "--workers", "2") == 0
    train, val = BetonFile(tmp_path / "train.beton"), BetonFile(tmp_path / "val.beton")
    assert (train.num_samples, val.num_samples) == (1497, 300)
    for split in (train, val):
        assert sorted(np.unique(split.labels)) == list(range(10))
        assert (split.images["width"] == 32).all() and (split.images["height"] == 32).all()
    per_class = np.bincount(val.labels)
    assert per_class.min() >= 28 and per_class.max() <= 32  # stratified: about 300 / 10 each
    image = train.read_image(0)
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all() and image.max() > 200
    assert list(json.loads((tmp_path / "classes.json").read_text())) == [str(d) for d in range(10)]
    # The split is a pure function of the seed.
    (again_train, _), _ = digits_split(32, 300, seed=0)
    assert np.array_equal(again_train, np.stack([train.read_image(i) for i in range(len(again_train))]))


@pytest.mark.parametrize("kaggle", [True, False], ids=["kaggle-flat-val", "val-synset-folders"])
def test_imagenet_layouts(tmp_path, kaggle):
    expected = make_imagenet(tmp_path / "imagenet", kaggle)
    out = tmp_path / "ffcv"
    assert run_main("imagenet", tmp_path / "imagenet", out, "--write-mode", "raw", "--workers", "1") == 0
    classes = json.loads((out / "classes.json").read_text())
    synsets = list(classes)
    assert synsets == sorted(synsets) and [c["index"] for c in classes.values()] == [0, 1, 2]
    expected_name = "tench, Tinca tinca" if kaggle else "n01440764"
    assert classes["n01440764"]["name"] == expected_name
    for split in ("train", "val"):
        beton = BetonFile(out / f"{split}.beton")
        assert beton.labels.tolist() == [synsets.index(s) for s in expected[split]]
    skipped = json.loads((out / "val.beton.skipped.json").read_text())["skipped"]
    assert [Path(item["path"]).name for item in skipped] == (["ILSVRC2012_val_00000099.JPEG"] if kaggle else [])


def test_subset_is_spread_over_the_classes():
    samples = [Sample(f"{label}/{i}.jpg", label) for label in range(4) for i in range(25)]
    subset = spread_subset(samples, 8)
    assert len(subset) == 8 and [s.label for s in subset] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert spread_subset(samples, 0) == samples


def test_a_dying_writer_worker_is_an_error_not_a_hang(tmp_path):
    from data_prep.writer import _write_beton

    class FailsHalfway:
        def __len__(self):
            return 8

        def __getitem__(self, index):
            if index == 5:
                raise OSError("source file vanished")
            return np.zeros((4, 4, 3), np.uint8), 0

    out = tmp_path / "never.beton"
    with pytest.raises(DataPrepError, match="writer worker exited"):
        _write_beton(FailsHalfway(), out, WriteOptions(workers=2, chunk_size=2), 48, 8 * 48)
    assert not out.exists() and not Path(f"{out}.partial").exists()


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file (big-endian header: magic, then each dimension), gzipped when the name ends in .gz."""
    content = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def test_fashion_mnist_subset_from_the_debian_package(tmp_path):
    source = Path("/usr/share/datasets/fashion-mnist")
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is not installed: run `make setup` (installs dataset-fashion-mnist)", pytrace=False)
    result = run_prep("fashion-mnist", tmp_path, "--subset", 1000, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"converted 2000 images in [\d.]+ s \(\d+ images/s, 2 workers\)", result.stdout.splitlines()[-1]
    )
    for split, prefix, total in (("train", "train", 60000), ("val", "t10k", 10000)):
        labels = np.frombuffer(gzip.decompress((source / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
        assert len(labels) == total
        beton = BetonFile(tmp_path / f"{split}.beton")
        positions = np.linspace(0, total - 1, 1000).round().astype(int)
        assert beton.labels.tolist() == labels[positions].tolist()
        assert beton.labels[0] == 9 and sorted(np.unique(beton.labels)) == list(range(10))  # first: an ankle boot
        image = beton.read_image(1)
        assert image.shape == (28, 28, 3) and (image[..., 0] == image[..., 2]).all() and image.max() > 100
    assert json.loads((tmp_path / "classes.json").read_text())["Ankle boot"]["index"] == 9


def test_fashion_mnist_from_a_source_folder_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    images = {
        "train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, (3, 28, 28), np.uint8),
    }
    labels = {"train": np.array([3, 1, 4, 1, 5, 9, 2], np.uint8), "t10k": np.array([6, 5, 3], np.uint8)}
    for prefix in images:  # gzipped (as Debian ships them) and plain (as after gunzip): both read
        suffix = ".gz" if prefix == "train" else ""
        write_idx(source / f"{prefix}-images-idx3-ubyte{suffix}", images[prefix], 0x0803)
        write_idx(source / f"{prefix}-labels-idx1-ubyte{suffix}", labels[prefix], 0x0801)
    assert run_main("fashion-mnist", tmp_path / "out", "--source", source, "--workers", 1) == 0
    for split, prefix in (("train", "train"), ("val", "t10k")):
        beton = BetonFile(tmp_path / "out" / f"{split}.beton")
        assert beton.labels.tolist() == labels[prefix].tolist()
        assert np.array_equal(beton.read_image(2), np.repeat(images[prefix][2][..., None], 3, axis=-1))

    broken = {
        "missing": (lambda f: f.unlink(), "dataset-fashion-mnist"),
        "not idx": (lambda f: f.write_bytes(b"\x00\x00\x09\x99" + bytes(20)), "magic 00000803 expected"),
        "truncated": (lambda f: f.write_bytes(f.read_bytes()[:-5]), "truncated"),
    }
    target = source / "t10k-images-idx3-ubyte"
    original = target.read_bytes()
    for case, (damage, words) in broken.items():
        damage(target)
        result = run_prep("fashion-mnist", tmp_path / case, "--source", source)
        assert result.returncode == 2, (case, result.stderr)
        assert (
            result.stderr.startswith("error: ") and "t10k-images-idx3-ubyte" in result.stderr and words in result.stderr
        )
        assert not (tmp_path / case / "train.beton").exists()  # every file is read before anything is written
        target.write_bytes(original)

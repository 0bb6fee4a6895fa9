"""clmae-prep downstream: the five downstream layouts (small fakes in the real file formats), the reference's
splits (sizes, seeds, labels, order), the recorded evaluation transform, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import random_split
from torchvision.datasets import ImageFolder

from data_prep.verify import BetonFile
from tests.data_fixtures import make_class_folders, make_cub, make_stanford_cars, make_svhn
from tests.test_data_prep import run_main, run_prep


def red_channel(beton: BetonFile) -> list[int]:
    """The number each fake image carries in its red channel (JPEG keeps a solid colour within 1-2 levels)."""
    return [round(float(beton.read_image(i)[..., 0].mean())) for i in range(beton.num_samples)]


def listing(out: Path) -> dict:
    return json.loads((out / "splits.json").read_text())


def test_svhn_official_splits_with_label_10_as_digit_0(tmp_path):
    written = make_svhn(tmp_path / "svhn", {"train_32x32.mat": 23, "test_32x32.mat": 12})
    out = tmp_path / "out"
    assert run_main("downstream", "svhn", tmp_path / "svhn", out, "--workers", "1") == 0
    for split, name in (("train", "train_32x32.mat"), ("val", "test_32x32.mat")):
        images, labels = written[name]
        beton = BetonFile(out / f"{split}.beton")
        expected = np.where(labels[:, 0] == 10, 0, labels[:, 0])  # torchvision's SVHN mapping
        assert beton.labels.tolist() == expected.tolist()
        assert 0 in beton.labels and 10 not in beton.labels
        for i in (0, len(expected) - 1):  # pixels exact (raw), X[..., i] is image i
            assert np.array_equal(beton.read_image(i), images[..., i])
        assert listing(out)[split][3] == {"path": f"{name}#3", "label": int(expected[3])}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["eval_transform"]["mode"] == "center_crop_resize" and dataset["eval_transform"]["normalize"] is False
    assert {s: v["count"] for s, v in dataset["splits"].items()} == {"train": 23, "val": 12}


def test_stanford_cars_devkit_annotations(tmp_path):
    expected = make_stanford_cars(tmp_path / "cars", classes=3, per_class={"train": 2, "test": 1})
    out = tmp_path / "out"
    # torchvision's root (the folder holding stanford_cars/) is accepted, as is stanford_cars/ itself.
    assert run_main("downstream", "stanford_cars", tmp_path / "cars", out, "--workers", "1") == 0
    for split, official in (("train", "train"), ("val", "test")):
        beton = BetonFile(out / f"{split}.beton")
        assert beton.labels.tolist() == [label for _, label in expected[official]]  # annotation order, class - 1
        folder = "cars_train" if official == "train" else "cars_test"
        assert [e["path"] for e in listing(out)[split]] == [f"{folder}/{f}" for f, _ in expected[official]]
    classes = json.loads((out / "classes.json").read_text())
    assert list(classes) == ["Car 0", "Car 1", "Car 2"]
    assert json.loads((out / "dataset.json").read_text())["eval_transform"]["normalize"] is True


def test_cub_reference_split_seed_123_and_padding(tmp_path):
    make_cub(tmp_path / "cub", classes=4, per_class=15)
    out = tmp_path / "out"
    assert run_main("downstream", "cub", tmp_path / "cub", out, "--workers", "2", "--write-mode", "raw") == 0
    # The reference's procedure over the official training images (ids 1, 3, 5, ...: image_id % 2 == 1).
    official_train = [i for i in range(1, 61) if i % 2 == 1]
    np.random.seed(123)
    indices = list(range(len(official_train)))
    np.random.shuffle(indices)
    cut = int(len(indices) * 0.9) + 1  # 30 images: 28 train, 2 val
    ids = {
        "train": [official_train[i] for i in indices[:cut]],
        "val": [official_train[i] for i in indices[cut:]],
        "test": [i for i in range(1, 61) if i % 2 == 0],
    }
    assert (len(ids["train"]), len(ids["val"])) == (28, 2)
    for split, split_ids in ids.items():
        beton = BetonFile(out / f"{split}.beton")
        assert red_channel(beton) == pytest.approx(split_ids, abs=2)
        assert beton.labels.tolist() == [(i - 1) // 15 for i in split_ids]
    # Image 1 is 150 x 200: zero-padded to 224 x 224 with torchvision's offsets (37 left, 37 right; 12 top).
    split = "train" if 1 in ids["train"] else "val"
    image = BetonFile(out / f"{split}.beton").read_image(ids[split].index(1))
    assert image.shape == (224, 224, 3)
    assert (image[:12] == 0).all() and (image[-12:] == 0).all()
    assert (image[:, :37] == 0).all() and (image[:, -37:] == 0).all()
    assert image[12:212, 37:187, 0].mean() == pytest.approx(1, abs=2)
    assert json.loads((out / "dataset.json").read_text())["eval_transform"] == {
        "mode": "center_crop",
        "crop_pixels": 224,
        "normalize": True,
        "reference": "CenterCrop(224) + ToTensor() + Normalize(ImageNet mean, std); no resize",
    }


def test_cub_split_sizes_of_the_real_set():
    from data_prep.downstream import cub_split_positions

    train, val = cub_split_positions(5994)  # CUB-200-2011's official training images
    assert (len(train), len(val)) == (5395, 599) and sorted(train + val) == list(range(5994))


def reference_split(root: Path, lengths: list[int]) -> list[list[tuple[str, int]]]:
    """What the reference does: ImageFolder(root), torch.manual_seed(0), random_split(dataset, lengths)."""
    dataset = ImageFolder(str(root))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        subsets = random_split(dataset, lengths)
    finally:
        torch.random.set_rng_state(state)
    return [
        [(str(Path(dataset.samples[i][0]).relative_to(root)), dataset.samples[i][1]) for i in s.indices]
        for s in subsets
    ]


def test_mit_indoor_random_split_under_the_global_seed(tmp_path):
    images = make_class_folders(tmp_path / "indoor" / "Images", {"bar": 4, "airport_inside": 5, "kitchen": 6})
    out = tmp_path / "out"
    sizes = [9, 4, 2]
    assert (
        run_main("downstream", "mit_indoor", tmp_path / "indoor", out, "--split-sizes", *sizes, "--workers", "1") == 0
    )
    expected = reference_split(images, sizes)
    for split, part in zip(("train", "val", "test"), expected, strict=True):
        assert [(e["path"], e["label"]) for e in listing(out)[split]] == part
        assert BetonFile(out / f"{split}.beton").labels.tolist() == [label for _, label in part]
    assert list(json.loads((out / "classes.json").read_text())) == ["airport_inside", "bar", "kitchen"]
    transform = json.loads((out / "dataset.json").read_text())["eval_transform"]
    assert transform["mode"] == "resize_square" and transform["normalize"] is False


def test_food101_random_90_10_split(tmp_path):
    images = make_class_folders(tmp_path / "food-101" / "images", {"apple_pie": 7, "ramen": 6, "sushi": 8})
    out = tmp_path / "out"
    assert run_main("downstream", "food101", tmp_path / "food-101", out, "--workers", "1") == 0
    expected = reference_split(images, [18, 3])  # int(0.9 * 21) = 18
    for split, part in zip(("train", "val"), expected, strict=True):
        assert [(e["path"], e["label"]) for e in listing(out)[split]] == part
        beton = BetonFile(out / f"{split}.beton")
        assert beton.labels.tolist() == [label for _, label in part]
    assert not (out / "test.beton").exists()


@pytest.mark.parametrize(
    "case",
    ["svhn-missing-test", "svhn-not-a-mat", "svhn-no-X", "cars-no-devkit", "cub-bad-line", "mit-wrong-count"],
)
def test_bad_layouts_are_one_line_errors_naming_the_file(tmp_path, case):
    from scipy.io import savemat

    src, out = tmp_path / "src", tmp_path / "out"
    args = {"svhn": ["svhn"], "cars": ["stanford_cars"], "cub": ["cub"], "mit": ["mit_indoor"]}[case.split("-")[0]]
    if case.startswith("svhn"):
        make_svhn(src, {"train_32x32.mat": 3, "test_32x32.mat": 3})
        if case == "svhn-missing-test":
            (src / "test_32x32.mat").unlink()
            named = src / "test_32x32.mat"
        elif case == "svhn-not-a-mat":
            (src / "test_32x32.mat").write_bytes(b"not a matlab file at all" * 10)
            named = src / "test_32x32.mat"
        else:
            savemat(src / "train_32x32.mat", {"y": np.ones((3, 1), np.uint8)})
            named = "'X'"
    elif case == "cars-no-devkit":
        src.mkdir()
        named = "devkit"
    elif case == "cub-bad-line":
        cub = make_cub(src, classes=1, per_class=2)
        (cub / "image_class_labels.txt").write_text("1 1\ntwo 1\n")
        named = f"{cub / 'image_class_labels.txt'}:2"
    else:
        make_class_folders(src / "Images", {"bar": 2, "kitchen": 2})
        named = "15,620"
    result = run_prep("downstream", *args, src, out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(named) in result.stderr
    assert not list(out.glob("*.beton")) if out.exists() else True


def test_clmae_eval_knn_with_data_on_a_downstream_folder(tmp_path):
    """`clmae-eval knn WEIGHTS --data OUT` on converted SVHN: the dataset's transform (no normalisation) is used."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from clmae.models import build_mae

    make_svhn(tmp_path / "svhn", {"train_32x32.mat": 30, "test_32x32.mat": 10})
    out = tmp_path / "svhn_ffcv"
    assert run_main("downstream", "svhn", tmp_path / "svhn", out, "--workers", "1") == 0
    torch.manual_seed(0)
    weights = tmp_path / "encoder.safetensors"
    save_file(build_mae("vit_tiny").encoder_state_dict(), weights)
    report = tmp_path / "knn.json"
    command = [sys.executable, "-m", "clmae.evaluate", "knn", str(weights), "--config", "tiny_digits"]
    result = subprocess.run(
        [*command, "--data", str(out), "--out", str(report)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    content = json.loads(report.read_text())
    assert content["train_path"] == str(out / "train.beton") and content["val_path"] == str(out / "val.beton")
    assert content["num_classes"] == 10 and 0 <= content["results"]["knn_l2_k5/acc1"] <= 100

    missing = subprocess.run([*command, "--data", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no train.beton or val.beton" in missing.stderr


def test_mit_indoor_takes_the_reference_sizes_for_15620_images(tmp_path):
    """The split is decided from the listing alone (no decoding): 15,620 empty files in 67 class folders."""
    import argparse

    from data_prep.downstream import mit_indoor

    images = tmp_path / "Images"
    for i in range(15620):
        folder = images / f"class_{i % 67:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").touch()
    splits = mit_indoor(tmp_path, argparse.Namespace(split_sizes=None)).splits
    assert {name: len(split.samples) for name, split in splits.items()} == {"train": 13000, "val": 2000, "test": 620}
    every = [sample.path for split in splits.values() for sample in split.samples]
    assert len(set(every)) == 15620

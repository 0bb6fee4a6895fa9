"""clmae.data: FFCV loaders on a real .beton; epoch order, rank sharding, mid-epoch resume, pixel values.

The file holds 24 constant-colour images; image i has value 10 * i and label i, so a batch's labels name
its samples and every output pixel has a known normalised value (a crop of a constant image is constant).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clmae.config import load_config
from clmae.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_loader,
    build_pretrain_loader,
    contiguous_shard,
    epoch_permutation,
    rank_order,
    step_sample_ids,
    steps_in_epoch,
)
from clmae.dist import detect
from data_prep.outputs import WriteOptions
from data_prep.writer import write_arrays

NUM_IMAGES, BATCH, IMG_SIZE = 24, 4, 8


def rank_env(rank: int, world_size: int):
    return detect({"RANK": str(rank), "WORLD_SIZE": str(world_size)}, cuda_available=False)


def expected_pixels(labels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1, 1): the normalised value of every pixel of the constant images with these labels."""
    value = (labels.double() * 10).view(-1, 1, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return ((value - mean) / std).float()


def labels_of(batches) -> list[list[int]]:
    return [labels.tolist() for _, labels in batches]


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "constant.beton"
    values = (np.arange(NUM_IMAGES) * 10).astype(np.uint8)
    images = np.broadcast_to(values[:, None, None, None], (NUM_IMAGES, 12, 16, 3)).copy()  # non-square
    write_arrays(images, np.arange(NUM_IMAGES), path, WriteOptions(max_resolution=None, write_mode="raw", workers=1))
    return path


def make_config(beton, *overrides: str):
    paths = [f"data.train_path={beton}", f"data.val_path={beton}"]
    return load_config("tiny_digits", [*paths, f"data.batch_size={BATCH}", "data.num_workers=1", *overrides])


@pytest.fixture(scope="module")
def rank_loaders(beton):
    cfg = make_config(beton)
    return [build_pretrain_loader(cfg, rank_env(rank, 2), img_size=IMG_SIZE) for rank in (0, 1)]


@pytest.mark.parametrize("num_samples", [8, 25, 100])
def test_every_split_of_a_global_batch_trains_each_step_on_the_same_micro_batches(num_samples):
    """The order is chunks of the permutation: (W ranks, K accumulation) and (W', K') with the same global
    batch give every optimiser step the same micro-batches, only on other ranks."""
    batch = 2
    for seed, epoch in ((0, 0), (7, 3)):
        permutation = epoch_permutation(num_samples, seed, epoch)
        assert sorted(permutation.tolist()) == list(range(num_samples))
        splits = [(1, 4), (2, 2), (4, 1)]  # (world size, accum): global batch 8
        steps = steps_in_epoch(num_samples, 8)
        per_split = []
        for world, accum in splits:
            orders = [rank_order(num_samples, seed, epoch, batch, accum, rank, world) for rank in range(world)]
            assert all(len(order) == steps * accum * batch for order in orders)
            micro = [order.reshape(steps, accum, batch) for order in orders]
            per_step = [sorted(tuple(m[s, k]) for m in micro for k in range(accum)) for s in range(steps)]
            per_split.append(per_step)
            for s in range(steps):
                assert sorted(x for chunk in per_step[s] for x in chunk) == sorted(
                    step_sample_ids(num_samples, seed, epoch, 8, s).tolist()
                )
        assert per_split[0] == per_split[1] == per_split[2]
        # The unseen rest of the epoch after step s is the permutation after s global batches.
        assert np.concatenate([step_sample_ids(num_samples, seed, epoch, 8, s) for s in range(steps)]).tolist() == (
            permutation[: steps * 8].tolist()
        )
    assert np.concatenate([contiguous_shard(num_samples, rank, 3) for rank in range(3)]).tolist() == (
        list(range(num_samples))
    )


def test_two_ranks_see_disjoint_samples_that_cover_the_epoch(rank_loaders):
    for epoch in (0, 1):
        seen = []
        for loader in rank_loaders:
            batches = labels_of(loader.iterate_epoch(epoch))
            assert len(batches) == loader.batches_per_epoch == len(loader) == 3
            assert all(len(batch) == BATCH for batch in batches)
            flat = [label for batch in batches for label in batch]
            assert flat == loader.epoch_indices(epoch).tolist()
            seen.append(set(flat))
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(NUM_IMAGES))
    assert rank_loaders[0].images_per_epoch == 12 and rank_loaders[0].num_images == NUM_IMAGES


def test_batches_are_normalised_float32_nchw_on_cpu(rank_loaders):
    torch.set_num_threads(2)
    for images, labels in rank_loaders[0].iterate_epoch(0):
        assert images.shape == (BATCH, 3, IMG_SIZE, IMG_SIZE) and images.dtype == torch.float32
        assert images.is_contiguous() and images.device.type == "cpu"
        assert labels.shape == (BATCH,) and labels.dtype == torch.int64
        assert torch.allclose(images, expected_pixels(labels).expand_as(images), atol=1e-5)
    assert torch.get_num_threads() == 2  # FFCV's side effect on torch's thread count is undone


def test_the_same_seed_gives_the_same_batches(rank_loaders, beton):
    loader = rank_loaders[0]
    first = labels_of(loader.iterate_epoch(2))
    assert labels_of(loader.iterate_epoch(2)) == first
    assert labels_of(loader.iterate_epoch(3)) != first
    rebuilt = build_pretrain_loader(make_config(beton), rank_env(0, 2), img_size=IMG_SIZE)
    assert labels_of(rebuilt.iterate_epoch(2)) == first
    other_seed = build_pretrain_loader(make_config(beton, "run.seed=1"), rank_env(0, 2), img_size=IMG_SIZE)
    assert other_seed.epoch_indices(2).tolist() != loader.epoch_indices(2).tolist()


def test_skipping_k_batches_gives_batches_k_plus_1_onwards(rank_loaders):
    loader = rank_loaders[1]
    uninterrupted = labels_of(loader.iterate_epoch(5))
    for skip in range(loader.batches_per_epoch + 1):
        assert labels_of(loader.iterate_epoch(5, skip_batches=skip)) == uninterrupted[skip:]
    for bad in (-1, loader.batches_per_epoch + 1):
        with pytest.raises(ValueError, match="skip_batches"):
            next(loader.iterate_epoch(5, skip_batches=bad))


def test_eval_loader_reads_its_share_in_order_without_dropping(beton):
    cfg = make_config(beton, "data.batch_size=5")
    loader = build_eval_loader(cfg, rank_env(1, 2), img_size=IMG_SIZE)
    assert (loader.images_per_epoch, loader.batches_per_epoch) == (12, 3)
    batches = list(loader.iterate_epoch(0))
    assert [labels.tolist() for _, labels in batches] == [[12, 13, 14, 15, 16], [17, 18, 19, 20, 21], [22, 23]]
    for images, labels in batches:
        assert torch.allclose(images, expected_pixels(labels).expand_as(images), atol=1e-5)


def test_a_missing_file_says_how_to_make_it(beton, tmp_path):
    cfg = make_config(beton, f"data.train_path={tmp_path / 'absent.beton'}")
    with pytest.raises(FileNotFoundError, match=r"data\.train_path: .*clmae-prep"):
        build_pretrain_loader(cfg, rank_env(0, 1), img_size=IMG_SIZE)


def test_cpu_pixel_pass_normalises_and_transposes():
    from clmae.data import _NormalizeToCHW

    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    result = _NormalizeToCHW().generate_code()(images, np.empty((2, 3, 5, 7), np.float32))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
    assert torch.allclose(torch.from_numpy(result), expected, atol=1e-5)


def test_crops_and_flips_follow_the_order_so_a_resume_sees_the_same_pixels(digits):
    cfg = load_config("tiny_digits", [f"data.train_path={digits / 'train.beton'}", "data.batch_size=32"])
    loader = build_pretrain_loader(cfg, rank_env(1, 2))
    uninterrupted = [images.clone() for images, _ in loader.iterate_epoch(7)]
    resumed = [images.clone() for images, _ in loader.iterate_epoch(7, skip_batches=9)]
    assert len(resumed) == len(uninterrupted) - 9
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[9:], resumed, strict=True))
    rebuilt = build_pretrain_loader(cfg, rank_env(1, 2))  # a new process after a restart: new numba threads
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, (x for x, _ in rebuilt.iterate_epoch(7)), strict=False))
    # ... and yet random: another epoch crops the same images differently.
    first = dict(zip(loader.epoch_indices(7).tolist(), torch.cat(uninterrupted), strict=False))
    other = dict(
        zip(loader.epoch_indices(8).tolist(), torch.cat([x.clone() for x, _ in loader.iterate_epoch(8)]), strict=False)
    )
    common = sorted(set(first) & set(other))[:50]
    assert sum(not torch.equal(first[i], other[i]) for i in common) > 45


def test_flips_mirror_about_half_of_the_images(digits):
    # A crop of scale 1 of a square image is the whole image: what comes out is it or its mirror.
    paths = [f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'train.beton'}"]
    cfg = load_config(
        "tiny_digits", [*paths, "data.batch_size=100", "data.crop_scale=[1.0, 1.0]", "data.eval_crop_ratio=1.0"]
    )
    augmented = build_pretrain_loader(cfg, rank_env(0, 1))
    plain = torch.cat([x.clone() for x, _ in build_eval_loader(cfg, rank_env(0, 1)).iterate_epoch(0)])
    images = torch.cat([x.clone() for x, _ in augmented.iterate_epoch(0)])
    originals = plain[torch.from_numpy(augmented.epoch_indices(0))]
    same = [torch.equal(a, b) for a, b in zip(images, originals, strict=True)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(images, originals, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0.4 < sum(m and not s for s, m in zip(same, mirrored, strict=True)) / len(same) < 0.6


def stripes() -> np.ndarray:
    """(12, 16, 3): columns 0-3 green (0, 160, 0), 4-11 red (200, 0, 0), 12-15 blue (0, 0, 240)."""
    image = np.zeros((12, 16, 3), np.uint8)
    image[:, :4], image[:, 4:12], image[:, 12:] = (0, 160, 0), (200, 0, 0), (0, 0, 240)
    return image


@pytest.mark.parametrize(
    "transform, expected_columns",
    [
        # Resize((4, 4)) of the whole image: one green, two red, one blue column.
        ({"mode": "resize_square", "normalize": False}, ["g", "r", "r", "b"]),
        # Centre square of the shorter side (12 x 12: columns 2-13), resized to 4: green half a column, ...
        ({"mode": "center_crop_resize", "crop_ratio": 1.0, "normalize": False}, [None, "r", "r", None]),
        # CenterCrop(8) without resizing when the model's size is 8 is taken at 8 below: columns 4-11, all red.
        ({"mode": "center_crop", "crop_pixels": 8, "normalize": True}, ["r"] * 8),
    ],
    ids=["resize_square", "center_crop_resize", "center_crop"],
)
def test_eval_loader_applies_the_datasets_recorded_transform(tmp_path, transform, expected_columns):
    import json

    path = tmp_path / "val.beton"
    write_arrays(
        stripes()[None], np.zeros(1, int), path, WriteOptions(max_resolution=None, write_mode="raw", workers=1)
    )
    (tmp_path / "dataset.json").write_text(json.dumps({"eval_transform": transform}))
    size = len(expected_columns)
    # The box each mode takes is what is under test: `area` resizes stripes without blending them across the
    # box's columns (bicubic's antialiasing mixes neighbours; tests/test_bicubic.py covers that filter).
    cfg = make_config(path, "data.interpolation=area")
    images, _ = next(build_eval_loader(cfg, rank_env(0, 1), img_size=size).iterate_epoch(0))
    pixels = images[0].double()
    if transform["normalize"]:
        mean, std = torch.tensor(IMAGENET_MEAN).double(), torch.tensor(IMAGENET_STD).double()
        pixels = pixels * std.view(3, 1, 1) + mean.view(3, 1, 1)
    pixels = (pixels * 255).round().permute(1, 2, 0).numpy()  # back to (H, W, 3) 0..255
    assert pixels.shape == (size, size, 3)
    colours = {"g": (0, 160, 0), "r": (200, 0, 0), "b": (0, 0, 240)}
    for column, name in enumerate(expected_columns):
        if name is not None:
            assert np.abs(pixels[:, column] - colours[name]).max() <= 1, (column, pixels[:, column])
    if transform["mode"] == "center_crop":
        assert images.min() < -1.0  # ImageNet-normalised (a zero channel is -2.0 for red's mean / std)
    else:
        assert 0.0 <= images.min() and images.max() <= 1.0  # ToTensor only: pixels / 255


def test_eval_loader_refuses_an_unknown_transform(tmp_path):
    import json

    from clmae.data import EvalTransformError

    path = tmp_path / "val.beton"
    write_arrays(
        stripes()[None], np.zeros(1, int), path, WriteOptions(max_resolution=None, write_mode="raw", workers=1)
    )
    (tmp_path / "dataset.json").write_text(json.dumps({"eval_transform": {"mode": "five_crop"}}))
    with pytest.raises(EvalTransformError, match=r"dataset\.json.*five_crop"):
        build_eval_loader(make_config(path), rank_env(0, 1), img_size=4)


def test_center_crop_box_rounds_as_torchvisions_center_crop():
    from torchvision.transforms.functional import center_crop

    from clmae.data import _center_pixels

    for height in range(8, 16):
        for width in range(8, 16):
            image = torch.arange(height * width).view(1, height, width)
            top, left, crop_h, crop_w = _center_pixels(height, width, None, 8)
            assert torch.equal(image[:, top : top + crop_h, left : left + crop_w], center_crop(image, [8, 8]))

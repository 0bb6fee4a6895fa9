"""clmae.bicubic through the real loaders: the FFCV pipeline's crops equal Pillow's bicubic resize.

Reference: what torchvision's RandomResizedCrop does on a PIL image, `image.crop(box).resize(size, BICUBIC)`,
on the very pixels the loader resampled: the stored raw pixels, or for JPEG samples the stored bytes
decoded by FFCV's own decoder (libjpeg-turbo through `ffcv.libffcv.imdecode`), so that the comparison
measures the resize and not a difference between JPEG decoders. The crop box and flip of each image are
re-drawn here from the decoder's seeding (`_batch_key`, `_image_seed`) and FFCV's `get_random_crop`.

Images: scikit-learn's digits upscaled to 24 and 32 px (data_prep's digits set), and generated photographs
(smooth colour gradients, shapes, sensor noise, a JPEG round trip) from 40 to 333 px a side, in two real
.beton files, one raw and one JPEG. Crops go to 48 px, so they are enlarged (digits, small photos), shrunk
(large photos) and both at once (tall and wide photos); the test checks that each kind occurs.

Bound: clmae.bicubic does Pillow's arithmetic (same float weights, same 22-bit fixed point, same rounding
between passes, same pass order as Pillow >= 13), so the outputs are equal. The asserted bound, mean
absolute difference < 0.01 and max <= 1 level, leaves room only for a 1-ulp difference in a float weight
(a compiler's fused multiply-add in Pillow's C build can move a weight across a fixed-point rounding
boundary), never for a different filter, box or pass order (those differ by several levels at edges).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clmae.bicubic import resize_crop_bicubic, vertical_first
from clmae.config import load_config
from clmae.data import (
    CROP_ASPECT_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _batch_key,
    _image_seed,
    build_eval_loader,
    build_pretrain_loader,
)
from clmae.dist import DistEnv
from data_prep.outputs import WriteOptions
from data_prep.sources import digits_split, scan_class_tree
from data_prep.verify import RAW_MODE, BetonFile
from data_prep.writer import write_files

SIZE, BATCH = 48, 8
PHOTO_SIDES = [(64, 48), (97, 131), (200, 150), (333, 250), (150, 40), (45, 180)]  # (width, height)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A natural-looking image: a smooth two-colour gradient under a coarse colour field, a few shapes,
    sensor noise, and the blocks and ringing of a JPEG round trip at quality 85."""
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = 0.7 * (a + (b - a) * ramp) + 0.3 * np.asarray(coarse, np.float64)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        box = (x0, y0, x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, np.float64) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """{"raw": path, "jpg": path}: the same 24 images, stored raw and as JPEG (quality 90)."""
    root = tmp_path_factory.mktemp("bicubic")
    rng = np.random.default_rng(0)
    for folder in ("digits", "photos"):
        (root / "images" / folder).mkdir(parents=True)
    for size in (24, 32):
        (train, _), _ = digits_split(size, val_count=300, seed=0)
        for k in range(6):
            Image.fromarray(train[k]).save(root / "images" / "digits" / f"{size}_{k}.png")
    for k, (width, height) in enumerate(PHOTO_SIDES * 2):
        photo(rng, width, height).save(root / "images" / "photos" / f"{k:02d}.png")
    paths = {}
    for mode in ("raw", "jpg"):
        paths[mode] = root / f"{mode}.beton"
        options = WriteOptions(max_resolution=None, write_mode=mode, workers=1)
        write_files(scan_class_tree(root / "images"), paths[mode], options)
    return paths


def stored_pixels(path) -> list[np.ndarray]:
    """Each sample's pixels as the loader sees them before cropping: raw as stored, JPEG decoded by FFCV."""
    from ffcv.libffcv import imdecode

    beton, images = BetonFile(path), []
    for index, meta in enumerate(beton.images):
        height, width = int(meta["height"]), int(meta["width"])
        if meta["mode"] == RAW_MODE:
            images.append(beton.read_image(index))
            continue
        data = np.fromfile(path, np.uint8, count=int(beton.sizes[index]), offset=int(meta["data_ptr"]))
        decoded = np.zeros((height, width, 3), np.uint8)
        imdecode(data, decoded, height, width, height, width, 0, 0, 1, 1, False, False)
        images.append(decoded)
    return images


def to_uint8(images) -> np.ndarray:
    """Undo the loader's normalisation: (B, 3, H, W) float32 -> (B, H, W, 3) uint8."""
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    pixels = images.numpy().transpose(0, 2, 3, 1).astype(np.float64) * std + mean
    return np.rint(pixels).clip(0, 255).astype(np.uint8)


def config(path, *overrides):
    data = [f"data.train_path={path}", f"data.val_path={path}", f"data.batch_size={BATCH}", "data.num_workers=1"]
    return load_config("tiny_digits", [*data, *overrides])


def pretrain_pairs(cfg, stored, epochs=(0, 1)):
    """(loader output, crop box (i, j, h, w), stored image, flipped) for each image of `epochs`."""
    loader = build_pretrain_loader(cfg, DistEnv.single(), img_size=SIZE)
    scale, ratio = np.array(cfg.data.crop_scale), np.array(CROP_ASPECT_RATIO)
    from ffcv.fields.rgb_image import get_random_crop

    pairs = []
    for epoch in epochs:
        order = loader.epoch_indices(epoch)
        for b, (images, _) in enumerate(loader.iterate_epoch(epoch)):
            ids = order[b * BATCH : (b + 1) * BATCH]
            key = _batch_key(np.uint64(cfg.run.seed), ids)
            for position, (out, sample) in enumerate(zip(to_uint8(images), ids, strict=True)):
                np.random.seed(int(_image_seed(np.uint64(key), position)))  # as the decoder seeds numba's generator
                source = stored[sample]
                box = get_random_crop(source.shape[0], source.shape[1], scale, ratio)
                pairs.append((out, box, source, np.random.rand() < 0.5))
    return pairs


def pillow_crop(source: np.ndarray, box) -> np.ndarray:
    i, j, h, w = box
    return np.asarray(Image.fromarray(source).crop((j, i, j + w, i + h)).resize((SIZE, SIZE), Image.BICUBIC))


def assert_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    diff = np.abs(ours.astype(np.int64) - reference)
    assert diff.mean() < 0.01 and diff.max() <= 1, f"{what}: mean {diff.mean():.4f}, max {diff.max()}"


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_pretraining_crops_are_pillows_bicubic(betons, mode):
    stored = stored_pixels(betons[mode])
    modes = {int(m) for m in BetonFile(betons[mode]).images["mode"]}
    assert modes == ({RAW_MODE} if mode == "raw" else {0})  # every sample goes through the decoder tested
    pairs = pretrain_pairs(config(betons[mode]), stored)
    ours = np.stack([out for out, *_ in pairs])
    reference = np.stack(
        [pillow_crop(src, box)[:, ::-1] if flip else pillow_crop(src, box) for _, box, src, flip in pairs]
    )
    assert_close(ours, reference, f"{mode}: {len(pairs)} crops")
    # The crops cover enlarging, shrinking, both at once, and Pillow 13's vertical-first order.
    kinds = {(h > SIZE, w > SIZE) for _, (i, j, h, w), _, _ in pairs}
    assert kinds == {(False, False), (True, True), (True, False), (False, True)}, kinds
    assert any(vertical_first(w, h, SIZE, SIZE) for _, (i, j, h, w), _, _ in pairs)
    assert 0.3 < np.mean([flip for *_, flip in pairs]) < 0.7


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_evaluation_centre_crops_are_pillows_bicubic(betons, mode):
    stored = stored_pixels(betons[mode])
    cfg = config(betons[mode])
    ours = np.concatenate(
        [to_uint8(x) for x, _ in build_eval_loader(cfg, DistEnv.single(), img_size=SIZE).iterate_epoch(0)]
    )
    ratio = cfg.data.eval_crop_ratio
    boxes = []
    for source in stored:
        side = int(ratio * min(source.shape[:2]))  # FFCV's get_center_crop
        boxes.append(((source.shape[0] - side) // 2, (source.shape[1] - side) // 2, side, side))
    reference = np.stack([pillow_crop(src, box) for src, box in zip(stored, boxes, strict=True)])
    assert_close(ours, reference, f"{mode} centre crops")


def test_area_interpolation_is_ffcvs_inter_area(betons):
    """`data.interpolation=area` keeps FFCV's OpenCV INTER_AREA resize, with the same crops as bicubic."""
    import cv2

    stored = stored_pixels(betons["raw"])
    area = pretrain_pairs(config(betons["raw"], "data.interpolation=area"), stored, epochs=(0,))
    for out, (i, j, h, w), source, flip in area:
        expected = cv2.resize(source[i : i + h, j : j + w], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(out, expected[:, ::-1] if flip else expected)
    assert any(not np.array_equal(out, pillow_crop(src, box)) for out, box, src, _ in area)


def test_kernel_matches_pillow_on_random_boxes():
    """The kernel alone, on noise (which the clipping between passes makes sensitive to the pass order and
    rounding) and on every kind of scale: exact."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(4, 160, 2))
        source = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        i, j = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        out_h, out_w = (int(v) for v in rng.integers(1, 120, 2))
        ours = np.empty((out_h, out_w, 3), np.uint8)
        resize_crop_bicubic(
            source, i, i + h, j, j + w, ours, np.empty(max(height * out_w, out_h * width) * 3, np.uint8)
        )
        reference = Image.fromarray(source).crop((j, i, j + w, i + h)).resize((out_w, out_h), Image.BICUBIC)
        assert np.array_equal(ours, np.asarray(reference)), ((height, width), (i, j, h, w), (out_h, out_w))

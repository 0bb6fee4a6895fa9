"""FFCV loaders for pre-training and evaluation, with epochs that can be reproduced and resumed mid-way.

Pre-training batches (SPEC section 6): RandomResizedCrop(img_size, scale=data.crop_scale, ratio (3/4, 4/3)),
horizontal flip, ImageNet mean/std; images float32 (B, 3, H, W), labels int64 (B,); the last partial batch
of a rank is dropped. Interpolation (`data.interpolation`): `bicubic` resamples each crop as the recipe's
torchvision RandomResizedCrop does on PIL images, `crop(box).resize(size, BICUBIC)`: antialiased, bit-exact
with Pillow (clmae/bicubic.py). `area` is what FFCV 1.0.2's own crop decoders do, OpenCV's INTER_AREA
hard-coded in its C extension: averages source pixels when shrinking, bilinear when enlarging.

Evaluation batches: the centre square of `data.eval_crop_ratio` of the shorter side resized to img_size
with the same interpolation (about the pixels of resize to img_size / ratio then centre crop: 256 -> 224),
no augmentation, every sample of the rank's share exactly once, in file order. A `dataset.json` beside the file
with an `eval_transform` (written by `clmae-prep downstream`) replaces that with the dataset's own transform
(`EvalTransform`), resized with the same interpolation.

Device: on CPU everything stays on CPU and images are contiguous NCHW, normalised and transposed in one
compiled pass (`_NormalizeToCHW`); the flip happens in the crop decoder.
On CUDA, uint8 crops are copied to the GPU (non_blocking, on FFCV's side stream) as channels_last, the
layout cuDNN's convolutions (the patch embedding) prefer, and normalised there by a torch op as each batch
is handed out (FFCV's NormalizeImage needs CuPy on a GPU).

Order. An epoch is one seeded permutation of the file (`torch.randperm`, seed + epoch) cut into chunks of
`data.batch_size` (b) ids; a chunk is one micro-batch. With W ranks and K accumulation steps (global batch
G = b K W), optimiser step s of the epoch takes chunks s K W .. (s + 1) K W - 1, chunk c going to rank
c mod W (so rank r's micro-batches are chunks r, r + W, r + 2W, ... in order). The last N mod G ids of the
permutation are left out of that epoch (the next epoch's permutation differs). Every micro-batch therefore
holds the same images whatever W and K are, as long as b and G stay: the images of step s are ids
s G .. (s + 1) G - 1 of the permutation, which is what lets a run continue on another number of ranks
(clmae.elastic) with each unseen image of the interrupted epoch seen exactly once.

Resume: `iterate_epoch(epoch, skip_batches=k)` hands FFCV the epoch's order without its first k batches, so
they are neither read nor decoded, and the batches that come are exactly batches k+1.. of the uninterrupted
epoch: the same images in the same order, with the same crops and flips (`SeededRandomResizedCrop` derives
each image's draws from its chunk's ids, which do not depend on the rank or the world size). A resumed run
sees bit-identical pixels.

CPU batches are views into FFCV's ring of `batches_ahead + 2` buffers: use a batch before drawing
`batches_ahead` (3) more, or clone it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

from clmae.bicubic import resize_crop_bicubic, scratch_bytes
from clmae.errors import ClmaeError
from clmae.ffcv_import import import_ffcv
from clmae.specs import IMAGENET_MEAN, IMAGENET_STD, model_image_size

if TYPE_CHECKING:
    from clmae.config import Config
    from clmae.dist import DistEnv


@contextlib.contextmanager
def _keep_torch_threads():
    """FFCV sets torch's intra-op thread count as a side effect (to 1 on import, to the loader's worker count
    when a loader is built and when an epoch starts); the training process's own setting is put back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


with _keep_torch_threads():  # importing FFCV sets torch's thread count to 1
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.fields.rgb_image import (
        IMAGE_MODES,
        ResizedCropRGBImageDecoder,
        get_center_crop,
        get_random_crop,
        imdecode,
        resize_crop,
    )
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

# FFCV's Compiler.compile flags (the same machine code, so the same crops), plus numba's on-disk cache: the
# per-image work is compiled once per machine instead of once per process (seconds at every launch).
_FFCV_JIT = dict(fastmath=True, nogil=True, error_model="numpy")


def _jit_cached(function):
    return njit(cache=True, **_FFCV_JIT)(function)


_random_crop, _center_crop = _jit_cached(get_random_crop), _jit_cached(get_center_crop)

# The crops of the decoders, by _crop_box. One compiled function for all of them (rather than one handed
# to each decoder's closure) has no closure, so numba caches it on disk like the functions it calls.
RANDOM_RESIZED_CROP, CENTER_CROP, WHOLE_IMAGE, CENTER_PIXELS = range(4)

CROP_ASPECT_RATIO = (3 / 4, 4 / 3)
RECORD_SAMPLES_ENV = "CLMAE_RECORD_SAMPLES"  # a debug aid: see EpochLoader.iterate_epoch
INTERPOLATIONS = ("bicubic", "area")  # data.interpolation


# --------------------------------------------------------------------------------------------------
# Epoch order: pure functions of (seed, epoch, rank, world size)
# --------------------------------------------------------------------------------------------------


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """All sample ids of `epoch` in training order: (num_samples,)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).numpy()


def steps_in_epoch(num_samples: int, global_batch: int) -> int:
    """Optimiser steps per epoch: whole global batches only."""
    return num_samples // global_batch


def step_sample_ids(num_samples: int, seed: int, epoch: int, global_batch: int, step: int) -> np.ndarray:
    """The ids optimiser step `step` of `epoch` trains on, whatever the world size: (global_batch,)."""
    return epoch_permutation(num_samples, seed, epoch)[step * global_batch : (step + 1) * global_batch]


def rank_order(
    num_samples: int, seed: int, epoch: int, batch_size: int, accum_steps: int, rank: int, world_size: int
) -> np.ndarray:
    """Rank `rank`'s sample ids for `epoch` in the order it batches them: chunks of `batch_size` ids of the
    permutation, chunk c to rank c mod world_size (see Order above). (steps x accum_steps x batch_size,)"""
    global_batch = batch_size * accum_steps * world_size
    used = steps_in_epoch(num_samples, global_batch) * global_batch
    chunks = epoch_permutation(num_samples, seed, epoch)[:used].reshape(-1, batch_size)
    return chunks[rank::world_size].reshape(-1)


def contiguous_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s part of 0..N-1 for evaluation: contiguous, no padding (shares differ by at most one)."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class _PlannedOrder:
    """Stands in for FFCV's TraversalOrder: gives FFCV's Loader the sample ids `iterate_epoch` planned.

    (FFCV 1.0.2 cannot take a custom order class through its constructor: it tests `isinstance(order,
    TraversalOrder)` on what it then calls as a class. So the loader is built with SEQUENTIAL and its
    order object replaced.)"""

    def __init__(self) -> None:
        self.indices = np.empty(0, dtype=np.int64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder, plus the horizontal flip, with every random draw reproducible and a
    choice of interpolation.

    FFCV draws crops inside numba-compiled worker threads from numba's own per-thread generators, which
    Python cannot seed: a resumed run would see other crops than an uninterrupted one. Here each image
    seeds its thread's generator, right before its draws, from (seed, the sample ids of its whole batch,
    its position in the batch). A batch is one chunk of the epoch's permutation, a pure function of
    (seed, epoch, batch size) that neither the rank nor the world size changes, so every crop and flip is
    too: the same after a resume, on any number of ranks, different in every epoch (FFCV's own MixUp
    seeds from the batch's indices the same way).

    Each image is decoded (JPEG) or read in place (raw), cropped, and resized by `interpolation`:
    "bicubic" (clmae.bicubic, Pillow's antialiased bicubic) or "area" (FFCV's OpenCV INTER_AREA).
    The crop sampling does not depend on it. Output: (B, H, W, 3) uint8, as FFCV's decoder.
    """

    def __init__(self, output_size, scale, ratio, flip_prob: float, seed: int, interpolation: str = "bicubic"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        super().__init__(output_size)
        self.scale, self.ratio = np.array(scale, dtype=np.float64), np.array(ratio, dtype=np.float64)
        self.flip_prob, self.seed, self.interpolation = flip_prob, seed, interpolation

    crop_kind = RANDOM_RESIZED_CROP  # what _crop_box draws, from self.scale and self.ratio
    get_crop_generator = None  # FFCV's hook for its own decode, which generate_code replaces

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (output, decoded) = super().declare_state_and_memory(previous_state)
        # Per image: the bicubic passes' intermediate image (none for area, which allocates inside OpenCV).
        height, width = self.output_size
        size = scratch_bytes(int(self.max_height), int(self.max_width), height, width)
        scratch = AllocationQuery((size if self.interpolation == "bicubic" else 1,), np.dtype(np.uint8))
        return state, (output, decoded, scratch)

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        parallel_range = Compiler.get_iterator()
        imdecode_c, resize_c = Compiler.compile(imdecode), _resize_function(self.interpolation)
        crop_kind, scale, ratio = self.crop_kind, self.scale, self.ratio
        flip_prob, seed = self.flip_prob, np.uint64(self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, scratch = my_storage
            key = _batch_key(seed, batch_indices)
            for dst_ix in parallel_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = _crop_box(crop_kind, height, width, _image_seed(key, dst_ix), scale, ratio)
                resize_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix], scratch[dst_ix])
                if np.random.rand() < flip_prob:
                    _mirror(destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class CenterCropDecoder(SeededRandomResizedCrop):
    """Evaluation: the centre square of `ratio` of the shorter side (FFCV's centre crop), resized by
    `interpolation`; nothing random, no flip."""

    def __init__(self, output_size, ratio: float, interpolation: str = "bicubic"):
        super().__init__(output_size, (1.0, 1.0), (1.0, 1.0), flip_prob=0.0, seed=0, interpolation=interpolation)
        self.ratio = np.array([ratio, ratio], dtype=np.float64)

    crop_kind = CENTER_CROP


def _resize_function(interpolation: str):
    """A compiled `resize(source, row0, row1, col0, col1, destination, scratch)`: the crop of source
    (H, W, 3) resized into destination (h, w, 3)."""
    if interpolation == "bicubic":
        return resize_crop_bicubic  # numba-compiled (and cached) in clmae.bicubic, without fastmath (exact weights)
    resize_area = Compiler.compile(resize_crop)

    def resize(source, row0, row1, col0, col1, destination, scratch):
        resize_area(source, row0, row1, col0, col1, destination)

    return Compiler.compile(resize)


@_jit_cached
def _batch_key(seed, batch_indices):
    """FNV-1a over the batch's sample ids: a 64-bit key that changes whenever the batch does."""
    key = np.uint64(0xCBF29CE484222325) ^ seed
    for index in batch_indices:
        key = (key ^ np.uint64(index)) * np.uint64(0x100000001B3)
    return key


@_jit_cached
def _image_seed(key, position):
    """The uint32 seed (numba's np.random.seed takes no more) of the image at `position` in a batch."""
    return np.uint32((key + np.uint64(position) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32))


@_jit_cached
def _crop_box(kind, height, width, image_seed, scale, ratio):
    """The crop (top, left, crop height, crop width) of a (height, width) image, drawn after seeding numba's
    generator of this thread with image_seed, for this image only (the flip draws next from it).

    RANDOM_RESIZED_CROP: FFCV's RandomResizedCrop, area fraction in scale (2,), aspect ratio in ratio (2,);
    CENTER_CROP: FFCV's centre square of ratio[0] of the shorter side; WHOLE_IMAGE: the whole image;
    CENTER_PIXELS: torchvision CenterCrop's box of side ratio[0] pixels."""
    np.random.seed(image_seed)
    if kind == RANDOM_RESIZED_CROP:
        return _random_crop(height, width, scale, ratio)
    if kind == CENTER_CROP:
        return _center_crop(height, width, scale, ratio[0])
    if kind == WHOLE_IMAGE:
        return 0, 0, np.int64(height), np.int64(width)
    return _center_pixels(height, width, scale, np.uint32(ratio[0]))


@_jit_cached
def _mirror(image):
    """Flip (H, W, 3) left-right in place."""
    height, width = image.shape[0], image.shape[1]
    for y in range(height):
        for x in range(width // 2):
            for c in range(3):
                image[y, x, c], image[y, width - 1 - x, c] = image[y, width - 1 - x, c], image[y, x, c]


# --------------------------------------------------------------------------------------------------
# Evaluation transforms: a dataset's own (clmae-prep downstream records the reference's), else the default
# --------------------------------------------------------------------------------------------------

EVAL_TRANSFORM_FILE = "dataset.json"
EVAL_MODES = ("center_crop_resize", "resize_square", "center_crop")


class EvalTransformError(ClmaeError, ValueError):
    """A dataset.json whose eval_transform cannot be applied."""


@dataclass(frozen=True)
class EvalTransform:
    """How evaluation turns a stored image into the model's size x size input.

    center_crop_resize: centre square of crop_ratio x the shorter side, resized (ratio 1: Resize + CenterCrop);
    resize_square:      the whole image resized to size x size, aspect ratio not kept (Resize((size, size)));
    center_crop:        centre crop_pixels x crop_pixels source pixels, rounded as torchvision's CenterCrop,
                        resized only when the model's size differs (CenterCrop(crop_pixels), no resize).
    normalize: ImageNet mean/std after scaling to [0, 1]; False: only the scaling (torchvision's ToTensor).
    """

    mode: str = "center_crop_resize"
    crop_ratio: float = 0.875
    crop_pixels: int = 224
    normalize: bool = True

    @classmethod
    def for_file(cls, data_file: Path, default_crop_ratio: float) -> EvalTransform:
        """The `eval_transform` of `dataset.json` beside `data_file`, else the default with `data.eval_crop_ratio`."""
        spec_file = data_file.parent / EVAL_TRANSFORM_FILE
        if not spec_file.is_file():
            return cls(crop_ratio=default_crop_ratio)
        try:
            spec = json.loads(spec_file.read_text()).get("eval_transform")
            if spec is None:
                return cls(crop_ratio=default_crop_ratio)
            transform = cls(
                mode=spec.get("mode"),
                crop_ratio=float(spec.get("crop_ratio", 1.0)),
                crop_pixels=int(spec.get("crop_pixels", 224)),
                normalize=bool(spec.get("normalize", True)),
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise EvalTransformError(f"{spec_file}: not a readable eval_transform ({err})") from None
        if transform.mode not in EVAL_MODES or not 0 < transform.crop_ratio <= 1 or transform.crop_pixels < 1:
            raise EvalTransformError(
                f"{spec_file}: eval_transform {spec} is invalid (mode one of {', '.join(EVAL_MODES)}; "
                "crop_ratio in (0, 1]; crop_pixels >= 1)"
            )
        return transform

    def decoder(self, size: int, interpolation: str):
        if self.mode == "resize_square":
            return _WholeImageDecoder((size, size), interpolation)
        if self.mode == "center_crop":
            return _CenterPixelsDecoder((size, size), self.crop_pixels, interpolation)
        return CenterCropDecoder((size, size), ratio=self.crop_ratio, interpolation=interpolation)


@_jit_cached
def _center_pixels(height, width, _, size):
    """torchvision CenterCrop's box: top = round((H - size) / 2), rounding half to even as Python's round."""
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if (height - crop_h) % 2 == 1 and top % 2 == 1:
        top += 1
    if (width - crop_w) % 2 == 1 and left % 2 == 1:
        left += 1
    return top, left, crop_h, crop_w


class _WholeImageDecoder(CenterCropDecoder):
    def __init__(self, output_size, interpolation: str):
        super().__init__(output_size, ratio=1.0, interpolation=interpolation)

    crop_kind = WHOLE_IMAGE


class _CenterPixelsDecoder(CenterCropDecoder):
    def __init__(self, output_size, crop_pixels: int, interpolation: str):
        super().__init__(output_size, ratio=1.0, interpolation=interpolation)
        self.ratio = np.array([crop_pixels, crop_pixels], dtype=np.float64)  # _crop_box's ratio[0]: the side

    crop_kind = CENTER_PIXELS


class _NormalizeToCHW(Operation):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 (x - mean) / std in one compiled pass: the CPU pipeline's
    last pixel pass. FFCV's NormalizeImage and ToTorchImage(channels_last=False) take two, the second a
    transposing copy in torch that cost about a third of the loader's throughput on 2 cores.
    mean, std: per channel, for pixels scaled to [0, 1] (mean 0, std 1: torchvision's ToTensor alone)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        mean, std = np.array(mean) * 255, np.array(std) * 255
        self.lookup = ((np.arange(256)[:, None] - mean) / std).astype(np.float32)  # (256, 3)

    def generate_code(self):
        parallel_range = Compiler.get_iterator()
        lookup = self.lookup

        def normalize_to_chw(images, destination):
            height, width = images.shape[1], images.shape[2]
            for i in parallel_range(images.shape[0]):
                for y in range(height):
                    for x in range(width):
                        for c in range(3):
                            destination[i, c, y, x] = lookup[images[i, y, x, c], c]
            return destination

        normalize_to_chw.is_parallel = True
        return normalize_to_chw

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        shape, dtype = (channels, height, width), np.dtype(np.float32)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)


class _NormalizeOnDevice(torch.nn.Module):
    """uint8 (B, 3, H, W) -> float32 (x - mean) / std, on the device and stream of the caller."""

    def __init__(self, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, device=device).mul(255).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).mul(255).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().sub_(self.mean).div_(self.std)  # keeps channels_last


def _pipelines(decoder, device: torch.device, mean_std) -> dict[str, list]:
    label = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cuda":
        return {"image": [decoder, _NormalizeToCHW(*mean_std), ToTensor()], "label": label}
    # Ends in FFCV's uint8 ring buffers, which FFCV fences against its side streams; normalising there
    # would hand out tensors allocated on a side stream that the caching allocator could recycle while
    # the training stream still reads them.
    image = [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    label.append(ToDevice(device, non_blocking=True))
    return {"image": image, "label": label}


class EpochLoader:
    """An FFCV Loader over one .beton whose epochs are planned here (see the module docstring).

    Attributes for the caller:
        num_images:        samples in the file
        images_per_epoch:  samples this rank sees per epoch (whole global batches only when shuffled)
        batches_per_epoch: batches this rank yields per epoch (also `len(loader)`); shuffled: optimiser
                           steps per epoch x accum_steps
    """

    def __init__(
        self,
        path: str | Path,
        decoder,
        device: str | torch.device,
        batch_size: int,
        num_workers: int,
        os_cache: bool,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        accum_steps: int = 1,
        mean_std: tuple = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        device = torch.device(device)
        # On CUDA the images are normalised as they are handed out, on the caller's stream.
        self._normalize = _NormalizeOnDevice(device, *mean_std) if device.type == "cuda" else None
        with _keep_torch_threads():
            self._ffcv = Loader(
                str(path),
                batch_size=batch_size,
                num_workers=num_workers,
                os_cache=os_cache,
                order=OrderOption.SEQUENTIAL,
                seed=seed,  # unused by the planned order; without it FFCV draws one from numpy's global RNG
                pipelines=_pipelines(decoder, device, mean_std),
                drop_last=False,  # applied to the planned order instead (epoch_indices)
            )
        self._order = _PlannedOrder()
        self._ffcv.traversal_order = self._order
        self.path = Path(path)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.accum_steps = accum_steps
        self.num_images = int(self._ffcv.reader.num_samples)
        if shuffle:
            steps = steps_in_epoch(self.num_images, batch_size * accum_steps * world_size)
            self.batches_per_epoch = steps * accum_steps
            self.images_per_epoch = self.batches_per_epoch * batch_size
        else:
            self.images_per_epoch = len(contiguous_shard(self.num_images, rank, world_size))
            self.batches_per_epoch = math.ceil(self.images_per_epoch / batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for `epoch` in the order they are batched: (images_per_epoch,)."""
        if not self.shuffle:
            return contiguous_shard(self.num_images, self.rank, self.world_size)
        return rank_order(
            self.num_images, self.seed, epoch, self.batch_size, self.accum_steps, self.rank, self.world_size
        )

    def iterate_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches k+1.. of `epoch` for k = skip_batches: `(images (B, 3, H, W) float32, labels (B,) int64)`.

        The skipped batches are not read. The order depends only on (seed, epoch, rank, world size, batch
        size, accumulation), so a resumed run that passes the step it stopped at sees the rest of the epoch
        it was interrupted in. With $CLMAE_RECORD_SAMPLES set to a directory, the sample ids of every batch
        handed out are appended there (one JSON line per batch; the tests check the image sets with it).
        """
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} is outside 0..{self.batches_per_epoch} (batches per epoch)")
        remaining = self.epoch_indices(epoch)[skip_batches * self.batch_size :]
        if len(remaining) == 0:
            return
        self._order.indices = remaining
        with _keep_torch_threads():
            batches = iter(self._ffcv)
        record = os.environ.get(RECORD_SAMPLES_ENV)
        try:
            for index, (images, labels) in enumerate(batches):
                if record:
                    self._record(Path(record), epoch, skip_batches + index, remaining[index * self.batch_size :])
                yield (self._normalize(images) if self._normalize is not None else images), labels
        finally:
            batches.close()  # stops FFCV's prefetch thread when the caller leaves the epoch early

    def _record(self, folder: Path, epoch: int, batch: int, ids: np.ndarray) -> None:
        entry = {"epoch": epoch, "batch": batch, "rank": self.rank, "world_size": self.world_size}
        entry.update(accum_steps=self.accum_steps, ids=ids[: self.batch_size].tolist())
        with open(folder / f"samples_w{self.world_size}_r{self.rank}_{os.getpid()}.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def _existing(path: str, key: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise FileNotFoundError(
            f"{key}: {path} does not exist; write it with `clmae-prep` (e.g. `clmae-prep digits data/digits`)"
        )
    return resolved


def build_pretrain_loader(
    cfg: Config, env: DistEnv, device: str | torch.device = "cpu", img_size: int | None = None
) -> EpochLoader:
    """The pre-training loader over `data.train_path`: this rank's shuffled share, augmented, drop_last.

    env: anything with `.rank` and `.world_size` (clmae.dist.DistEnv). img_size: None means
    `model.img_size`, else the model's native size.
    """
    size = img_size or model_image_size(cfg.model)
    decoder = SeededRandomResizedCrop(
        (size, size),
        scale=cfg.data.crop_scale,
        ratio=CROP_ASPECT_RATIO,
        flip_prob=0.5,
        seed=cfg.run.seed,
        interpolation=cfg.data.interpolation,
    )
    return _loader(cfg, env, _existing(cfg.data.train_path, "data.train_path"), decoder, device, shuffle=True)


def build_eval_loader(
    cfg: Config,
    env: DistEnv,
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    path: str | None = None,
) -> EpochLoader:
    """The evaluation loader over `path` (default `data.val_path`): this rank's contiguous share, in order,
    centre-cropped, not augmented, no sample dropped. Pass `data.train_path` for a probe's training features."""
    size = img_size or model_image_size(cfg.model)
    source = path or cfg.data.val_path
    data_file = _existing(source, "data.val_path" if path is None else "evaluation data")
    transform = EvalTransform.for_file(data_file, cfg.data.eval_crop_ratio)
    mean_std = (IMAGENET_MEAN, IMAGENET_STD) if transform.normalize else ((0.0,) * 3, (1.0,) * 3)
    decoder = transform.decoder(size, cfg.data.interpolation)
    return _loader(cfg, env, data_file, decoder, device, shuffle=False, mean_std=mean_std)


def _loader(cfg: Config, env: DistEnv, path: Path, decoder, device, shuffle: bool, **kwargs) -> EpochLoader:
    return EpochLoader(
        path,
        decoder,
        device=device,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        os_cache=cfg.data.os_cache,
        seed=cfg.run.seed,
        rank=env.rank,
        world_size=env.world_size,
        shuffle=shuffle,
        accum_steps=cfg.train.accum_steps,
        **kwargs,
    )

"""Antialiased bicubic resampling of uint8 RGB crops, computed as Pillow computes `Image.resize(size, BICUBIC)`.

FFCV 1.0.2 resizes crops with OpenCV's INTER_AREA, fixed in its C code. The MAE / CL-MAE recipe resizes
with torchvision's RandomResizedCrop on PIL images, i.e. `image.crop(box).resize(size, BICUBIC)`. This
module reproduces Pillow's algorithm (libImaging/Resample.c) so that the FFCV decoders in clmae.data can
resample like the recipe inside numba-compiled worker threads:

- Filter: Keys' cubic convolution with a = -0.5, support 2 input pixels. When shrinking by a factor
  s = in / out > 1, the filter is stretched by s (support 2 s, weights evaluated at distance / s): an
  antialiasing low-pass, where OpenCV's plain INTER_CUBIC would alias.
- Output pixel x samples around the input position (x + 0.5) * s (pixel centres aligned), over the taps
  round(centre -/+ support), clipped to the input. The taps' weights are normalised to sum 1, so the
  border taps that fall outside the crop are dropped and the others renormalised (torchvision crops
  first, so its filter never reads past the crop either).
- Fixed point: the normalised weights are rounded to 22 fractional bits (Pillow's PRECISION_BITS for 8-bit
  images), accumulated in integers with a half added for rounding, shifted and clipped to 0..255.
- Separable: one pass per axis, its result rounded to uint8 before the other, as Pillow does. Horizontal
  first (over the rows the vertical pass reads), except where Pillow 13 goes vertical first: when the
  height loses more than twice as many pixels as the width. With the same order and rounding the result
  is bit-exact with Pillow's; with Pillow < 13's order (always horizontal first) the results differ only
  where the intermediate image was rounded or clipped differently.

Compiled with numba's defaults (no fastmath), so the float weights are computed in the same order as in C.
tests/test_bicubic.py checks the output against Pillow's on real images through a real .beton.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

PRECISION_BITS = 22  # Pillow, 8-bit images: 32 - 8 - 2 bits, so that 255 * the weights fit in an int32
HALF = 1 << (PRECISION_BITS - 1)
SUPPORT = 2.0  # input pixels on each side of the centre, before stretching
A = -0.5  # Keys' parameter, as Pillow's BICUBIC (and torchvision's antialiased bicubic)


@njit(nogil=True, cache=True)
def cubic(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5: 1 at 0, 0 at the other integers, 0 from |x| = 2."""
    x = abs(x)
    if x < 1.0:
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A
    return 0.0


@njit(nogil=True, cache=True)
def filter_taps(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The taps of resampling the input span [in0, in1) of a line of `in_size` pixels to `out_size` pixels.

    Returns (first, count, weights): for output pixel x, input pixels first[x] .. first[x] + count[x] - 1
    (within 0..in_size - 1) weighted by weights[x, :count[x]], fixed point with PRECISION_BITS fractional bits.
    first, count: (out_size,) int64; weights: (out_size, taps) int32, zero past count.
    """
    scale = (in1 - in0) / out_size
    stretch = max(scale, 1.0)  # widen the filter when shrinking (antialiasing); never narrow it
    support = SUPPORT * stretch
    inverse = 1.0 / stretch  # multiplied, not divided by: Pillow's rounding
    taps = math.ceil(support) * 2 + 1
    first = np.zeros(out_size, np.int64)
    count = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.int32)
    exact = np.zeros(taps, np.float64)
    for x in range(out_size):
        centre = in0 + (x + 0.5) * scale
        # int() truncates towards zero, as C's cast does; the bounds are then clipped to the line.
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        total = 0.0
        for t in range(hi - lo):
            exact[t] = cubic((t + lo - centre + 0.5) * inverse)
            total += exact[t]
        for t in range(hi - lo):
            w = exact[t] / total if total != 0.0 else exact[t]
            # Round half away from zero, then truncate: Pillow's normalize_coeffs_8bpc.
            weights[x, t] = int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0.0 else -0.5))
        first[x], count[x] = lo, hi - lo
    return first, count, weights


@njit(nogil=True, cache=True)
def _clip8(accumulator: int) -> np.uint8:
    """Pillow's clip8: the fixed-point sum (rounding half included) as a byte, saturated."""
    return np.uint8(min(max(accumulator >> PRECISION_BITS, 0), 255))


@njit(nogil=True, cache=True)
def _horizontal(source, row0, col0, first, count, weights, out):
    """out[r, x] = sum over taps t of source[row0 + r, col0 + first[x] + t] * weights[x, t], rounded and
    clipped to uint8, per channel.

    Images flattened to rows of bytes (contiguous rows index fastest in numba):
    source: (H, W * 3) uint8, C-contiguous; out: (R, out_w * 3) uint8, C-contiguous."""
    for r in range(out.shape[0]):
        line, out_line = source[row0 + r], out[r]
        for x in range(out.shape[1] // 3):
            base = (col0 + first[x]) * 3
            red = green = blue = HALF
            for t in range(count[x]):
                w = weights[x, t]
                red += np.int32(line[base + 3 * t]) * w
                green += np.int32(line[base + 3 * t + 1]) * w
                blue += np.int32(line[base + 3 * t + 2]) * w
            out_line[3 * x], out_line[3 * x + 1], out_line[3 * x + 2] = _clip8(red), _clip8(green), _clip8(blue)


@njit(nogil=True, cache=True)
def _vertical(source, row0, col0, first, count, weights, out):
    """out[y] = sum over taps t of source[row0 + first[y] + t, col0:col0 + out_w] * weights[y, t], rounded
    and clipped to uint8.

    Images flattened to rows of bytes, so that the inner loop runs along memory and is vectorised:
    source: (H, W * 3) uint8, C-contiguous; out: (out_h, out_w * 3) uint8, C-contiguous."""
    width = out.shape[1]
    accumulator = np.empty(width, np.int32)  # Pillow's int: 255 * the weights' absolute sum fits
    for y in range(out.shape[0]):
        accumulator[:] = HALF
        for t in range(count[y]):
            w = weights[y, t]
            line = source[row0 + first[y] + t, col0 : col0 + width]
            for k in range(width):
                accumulator[k] += np.int32(line[k]) * w
        for k in range(width):
            out[y, k] = _clip8(accumulator[k])


@njit(nogil=True, cache=True)
def vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow >= 13's choice of pass order: vertical first when the height shrinks by more than twice as
    many pixels as the width does (cheaper). The order matters only through the rounding and clipping
    between the passes."""
    return in_h > out_h and in_h - out_h > 2 * (in_w - out_w)


@njit(nogil=True, cache=True)
def resize_crop_bicubic(source, row0, row1, col0, col1, destination, scratch):
    """destination = the crop source[row0:row1, col0:col1] resized to destination's size, as Pillow's
    `Image.fromarray(source).crop((col0, row0, col1, row1)).resize(size, Image.BICUBIC)`.

    source: (H, W, 3) uint8, C-contiguous; destination: (out_h, out_w, 3) uint8, C-contiguous;
    scratch: flat uint8 with room for the intermediate image, max((row1 - row0) * out_w, out_h * (col1 - col0)) * 3
    bytes (`scratch_bytes`).
    """
    out_h, out_w = destination.shape[0], destination.shape[1]
    height, width = row1 - row0, col1 - col0
    if height == out_h and width == out_w:  # Pillow copies; the passes would too (weights 1 and 0)
        destination[:] = source[row0:row1, col0:col1]
        return
    y_first, y_count, y_weights = filter_taps(height, 0.0, float(height), out_h)
    x_first, x_count, x_weights = filter_taps(width, 0.0, float(width), out_w)
    flat_source = source.reshape(source.shape[0], source.shape[1] * 3)
    flat_out = destination.reshape(out_h, out_w * 3)
    if vertical_first(width, height, out_w, out_h):
        columns = scratch[: out_h * width * 3].reshape(out_h, width * 3)
        _vertical(flat_source, row0, col0 * 3, y_first, y_count, y_weights, columns)
        _horizontal(columns, 0, 0, x_first, x_count, x_weights, flat_out)
    else:
        top, bottom = y_first[0], y_first[out_h - 1] + y_count[out_h - 1]  # the crop rows the output reads
        rows = scratch[: (bottom - top) * out_w * 3].reshape(bottom - top, out_w * 3)
        _horizontal(flat_source, row0 + top, col0, x_first, x_count, x_weights, rows)
        _vertical(rows, 0, 0, y_first - top, y_count, y_weights, flat_out)


def scratch_bytes(max_height: int, max_width: int, out_h: int, out_w: int) -> int:
    """Bytes of `scratch` that `resize_crop_bicubic` needs for any crop of an image up to max_height x max_width."""
    return max(max_height * out_w, out_h * max_width) * 3

"""Writing .beton files with FFCV's DatasetWriter, made safe for conversions that run for hours.

Two passes over image files:
1. check: every file is decoded once, in a process pool, exactly as the writer will decode it (`probe`).
   What does not decode (corrupt, truncated, empty, not an image) is set aside with the reason.
2. write: FFCV's writer workers read only the files that passed. FFCV needs the sample count up front
   and gives each sample a slot, so a file that fails at this point could not be left out; and an
   exception in one of its workers would leave FFCV's writer waiting forever. The check pass costs a
   second decode per image and buys a conversion that never stops on bad input.

The output is written as `OUT.partial` and renamed when complete (a killed conversion leaves nothing
that looks finished); the skipped files and their reasons go to `OUT.skipped.json`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clmae.ffcv_import import import_ffcv
from data_prep import DataPrepError
from data_prep.outputs import WriteOptions, check_output, partial_path, write_skip_report
from data_prep.sources import Probe, Sample, SourceSet, load_rgb, probe

import_ffcv()  # FFCV's first import goes through it: clmae/ffcv_import.py
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.memory_allocator import MemoryAllocator  # noqa: E402
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter  # noqa: E402

# Above this many bytes of pixels a dataset gets FFCV's default 8 MiB pages; below it FFCV's minimum of
# 2 MiB, because every writer worker pads its last page and small sets would be mostly padding.
LARGE_DATASET_BYTES = 256 << 20


@dataclass
class WriteResult:
    path: Path
    written: int
    skipped: list[tuple[str, str]]
    report: Path | None

    def summary(self) -> str:
        listed = f" (listed in {self.report})" if self.report is not None else ""
        return f"{self.path}: wrote {self.written} images, skipped {len(self.skipped)}{listed}"


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def write_files(source: SourceSet, out: Path, options: WriteOptions, overwrite: bool = False) -> WriteResult:
    """Check every file of `source`, write the readable ones to `out`, report the rest beside it."""
    check_output(out, overwrite)
    paths = [sample.path for sample in source.samples]
    probes = _probe_all(paths, options)
    skipped = list(source.skipped)
    good: list[Sample] = []
    sizes = []
    for sample, result in zip(source.samples, probes, strict=True):
        if result.error is None:
            good.append(sample)
            sizes.append(_padded_size(_stored_size(result.size, options.max_resolution), options.pad_to))
        else:
            skipped.append((sample.path, result.error))
    if not good:
        report = write_skip_report(out, 0, skipped)
        raise DataPrepError(f"none of the {len(paths)} files is a readable image; reasons in {report}")
    pixel_bytes = [width * height * 3 for width, height in sizes]
    _write_beton(_FileDataset(good, options.pad_to), out, options, max(pixel_bytes), sum(pixel_bytes))
    return WriteResult(out, len(good), skipped, write_skip_report(out, len(good), skipped))


def write_arrays(
    images: np.ndarray, labels: np.ndarray, out: Path, options: WriteOptions, overwrite: bool = False
) -> WriteResult:
    """Write in-memory images (N, H, W, 3) uint8 with their labels (N,) to `out`."""
    check_output(out, overwrite)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    sample_bytes = int(np.prod(images.shape[1:]))
    _write_beton(_ArrayDataset(images, labels), out, options, sample_bytes, sample_bytes * len(images))
    return WriteResult(out, len(images), [], None)


# --------------------------------------------------------------------------------------------------
# Pass 1: check
# --------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str) -> tqdm:
    # In a batch job's log file every redraw is a new line: redraw rarely there.
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)


def _probe_all(paths: list[str], options: WriteOptions) -> list[Probe]:
    chunk = max(1, min(options.chunk_size, len(paths) // (4 * options.workers)))
    with multiprocessing.Pool(options.workers) as pool, _progress(len(paths), "checking") as bar:
        results = []
        for result in pool.imap(probe, paths, chunksize=chunk):
            results.append(result)
            bar.update()
        return results


def _stored_size(size: tuple[int, int], max_resolution: int | None) -> tuple[int, int]:
    """(width, height) after FFCV's writer shrinks the longest side to `max_resolution`."""
    width, height = size
    if max_resolution is None or max(width, height) <= max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    return int(ratio * width), int(ratio * height)


# --------------------------------------------------------------------------------------------------
# Pass 2: write
# --------------------------------------------------------------------------------------------------


def _padded_size(size: tuple[int, int], pad_to: int | None) -> tuple[int, int]:
    return size if pad_to is None else (max(size[0], pad_to), max(size[1], pad_to))


def pad_centered(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) zero-padded to at least size x size with torchvision's CenterCrop offsets (the extra pixel
    of an odd difference goes right / bottom)."""
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return image
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    return np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))


class _FileDataset:
    """What FFCV's writer workers index: files that already decoded once in the check pass."""

    def __init__(self, samples: list[Sample], pad_to: int | None = None):
        self.samples, self.pad_to = samples, pad_to

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        return (image if self.pad_to is None else pad_centered(image, self.pad_to)), label


class _ArrayDataset:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def _page_size(max_sample_bytes: int, total_bytes: int) -> int:
    page = 4 * MIN_PAGE_SIZE if total_bytes > LARGE_DATASET_BYTES else MIN_PAGE_SIZE
    while page < max_sample_bytes:  # a sample never spans pages
        page *= 2
    return page


def _write_beton(dataset, out: Path, options: WriteOptions, max_sample_bytes: int, total_bytes: int) -> None:
    fields = {
        "image": RGBImageField(
            write_mode=options.write_mode,
            max_resolution=options.max_resolution,
            smart_threshold=options.smart_threshold,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": IntField(),
    }
    tmp = partial_path(out)
    writer = _MonitoredWriter(
        str(tmp), fields, page_size=_page_size(max_sample_bytes, total_bytes), num_workers=options.workers
    )
    writer.description = f"writing {out.name}"
    try:
        writer.from_indexed_dataset(dataset, chunksize=options.chunk_size)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _MonitoredWriter(DatasetWriter):
    """FFCV 1.0.2's DatasetWriter with an images/s progress bar, and an error instead of a hang when a
    worker process dies (FFCV's own loop waits for a sample count that a dead worker never delivers)."""

    description = "writing"

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work: multiprocessing.Queue = multiprocessing.Queue()
        for task in queue_content:
            work.put(task)
        for _ in range(self.num_workers):
            work.put(None)  # one stop token per worker
        allocations: multiprocessing.Queue = multiprocessing.Queue()
        done = multiprocessing.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations)
        workers = [
            multiprocessing.Process(target=work_fn, args=(*worker_args, *extra_worker_args))
            for _ in range(self.num_workers)
        ]
        try:
            for worker in workers:
                worker.start()
            with _progress(num_samples, self.description) as bar:
                while bar.n < num_samples:
                    self._raise_if_a_worker_died(workers)
                    time.sleep(0.1)
                    bar.update(done.value - bar.n)
            allocation_list = []
            while len(allocation_list) < len(workers):
                try:
                    allocation_list.append(allocations.get(timeout=0.5))
                except queue.Empty:
                    self._raise_if_a_worker_died(workers)
            for worker in workers:
                worker.join()
            self.finalize([entry for worker_allocations in allocation_list for entry in worker_allocations])
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _raise_if_a_worker_died(self, workers: list[multiprocessing.Process]) -> None:
        for worker in workers:
            if worker.exitcode not in (None, 0):
                raise DataPrepError(
                    f"a writer worker exited with code {worker.exitcode} while writing {self.fname} (its error "
                    "is printed above); a source file may have changed after the check pass"
                )

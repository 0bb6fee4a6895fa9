"""clmae-viz masks: a valid PNG of the expected size, from image files and from the validation set, for one
checkpoint and across training; bad images give a one-line error."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clmae.checkpoint import STEP_DIR_PATTERN, checkpoint_root, is_complete
from clmae.viz import _main as viz_main

pytestmark = pytest.mark.distributed

CELL = 96  # 32 px digits, upscaled 3x so that a 4 px patch stays visible
ROWS = 4  # image, masked image, reconstruction, keep scores
LABEL = 16  # the step / epoch strip above each band over training


def draw(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert viz_main(argv) == 0


def test_masks_of_image_files(pretrained_runs, tmp_path):
    files = []
    for i, size in enumerate([(40, 30), (32, 32), (17, 50)]):  # any size: resized and centre-cropped
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    out = tmp_path / "masks.png"
    draw(["masks", str(pretrained_runs["zero2"]), "--images", *files, "--out", str(out)])
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.size == (3 * CELL, ROWS * CELL)


def test_masks_over_training_from_validation_images(pretrained_runs, tmp_path):
    run_dir = pretrained_runs["zero2"]
    root = checkpoint_root(run_dir)
    saved = [p for p in root.iterdir() if STEP_DIR_PATTERN.match(p.name) and is_complete(p)]
    out = tmp_path / "over_training.png"
    draw(["masks", "--over-training", str(run_dir), "--from-val", "5", "--out", str(out)])
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (5 * CELL, len(saved) * (LABEL + ROWS * CELL))
    assert len(saved) >= 2


def test_bad_inputs_give_one_line_errors(pretrained_runs, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    for args, words in [
        (["masks", str(pretrained_runs["zero3"]), "--images", str(not_an_image), "--out", str(tmp_path / "a.png")],
         "not a readable image"),
        (["masks", str(tmp_path / "nothing"), "--from-val", "2", "--out", str(tmp_path / "b.png")],
         "no such checkpoint"),
    ]:  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "clmae.viz", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr, result.stderr

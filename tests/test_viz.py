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
from clmae.viz import LEGEND_WIDTH
from clmae.viz import _main as viz_main

pytestmark = pytest.mark.distributed

CELL = 96  # the 16 px digits of the pre-trained runs, upscaled 6x so that a 4 px patch stays visible
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
        assert picture.size == (LEGEND_WIDTH + 3 * CELL, ROWS * CELL)


def test_masks_over_training_from_validation_images(pretrained_runs, tmp_path):
    run_dir = pretrained_runs["zero2"]
    root = checkpoint_root(run_dir)
    saved = [p for p in root.iterdir() if STEP_DIR_PATTERN.match(p.name) and is_complete(p)]
    out = tmp_path / "over_training.png"
    draw(["masks", "--over-training", str(run_dir), "--from-val", "5", "--out", str(out)])
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (LEGEND_WIDTH + 5 * CELL, len(saved) * (LABEL + ROWS * CELL))
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


def test_curriculum_record_survives_pruning_and_draws_labelled_rows_and_statistics(tmp_path):
    """What training keeps in <run_dir>/curriculum/ (here written directly, as clmae.train.record_curriculum
    does, from a real tiny MAE + CMM): a labelled picture per picture epoch and one statistics entry per epoch,
    a resumed epoch replacing its entry; `clmae-viz curriculum` stacks the pictures and plots the statistics."""
    import json

    import torch

    from clmae.config import load_config, save_config
    from clmae.curriculum import curriculum_factor
    from clmae.masking import build_models
    from clmae.viz import (
        curriculum_label,
        label_band,
        load_curriculum_stats,
        mask_statistics,
        render_masks,
        save_curriculum_snapshot,
    )

    cfg = load_config("tiny_digits", ["train.epochs=4"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    mae, cmm = build_models(cfg)
    images = torch.randn(4, 3, 32, 32)
    for epoch in (0, 1, 2, 2, 3, 4):  # epoch 2 twice: a run resumed at that boundary
        lam = None if epoch == 0 else curriculum_factor(epoch - 1, 4)
        stats = mask_statistics(mae, cmm, images, norm_pix_loss=False)
        picture = (
            label_band(render_masks(mae, cmm, images, False), curriculum_label(epoch, lam)) if epoch % 2 == 0 else None
        )
        save_curriculum_snapshot(run_dir, epoch, lam, stats, picture)
    records = load_curriculum_stats(run_dir)
    assert sorted(records) == [0, 1, 2, 3, 4]
    assert records[0]["lambda"] is None and records[4]["lambda"] == -1.0
    assert 0 < records[1]["kept"] < 1 and 0 <= records[1]["entropy"] <= 1 and records[1]["diversity"] >= 0
    assert records[1]["rec_soft"] > 0
    assert json.loads((run_dir / "curriculum" / "stats.json").read_text())[2]["epoch"] == 2
    assert curriculum_label(2, 0.5) == "epoch 2: lambda +0.50 (partner)"
    assert curriculum_label(3, -0.1) == "epoch 3: lambda -0.10 (near neutral)"
    assert curriculum_label(4, -1.0) == "epoch 4: lambda -1.00 (adversary)"

    out = tmp_path / "pictures"
    assert viz_main(["curriculum", str(run_dir), "--out-dir", str(out)]) == 0
    stacked = np.asarray(Image.open(out / "masks_over_training.png"))
    one = np.asarray(Image.open(run_dir / "curriculum" / "masks_epoch_00000.png"))
    assert stacked.shape[0] == 3 * one.shape[0]  # epochs 0, 2, 4
    assert Image.open(out / "mask_stats.png").size[0] > 300

"""clmae.checkpoint in one process: finding the newest whole checkpoint, pruning, resume resolution (the
formats users bring to checkpoint.init_from are tested in tests/test_weights.py)."""

from __future__ import annotations

import json

import pytest
import torch

from clmae.checkpoint import (
    COMPLETE_MARKER,
    LATEST_FILE,
    CheckpointError,
    capture_rng_state,
    checkpoint_root,
    find_latest,
    prune,
    resolve_resume,
    restore_rng_state,
    step_dir_name,
)
from clmae.config import load_config


def fake_checkpoint(run_dir, step: int, complete: bool = True):
    path = checkpoint_root(run_dir) / step_dir_name(step)
    path.mkdir(parents=True)
    if complete:
        (path / "client_state.json").write_text(json.dumps({"global_step": step}))
        (path / COMPLETE_MARKER).write_text("")
    return path


def test_latest_skips_interrupted_saves_and_a_stale_pointer(tmp_path):
    assert find_latest(tmp_path) is None
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # killed during its save
    assert find_latest(tmp_path).name == step_dir_name(20)
    (checkpoint_root(tmp_path) / LATEST_FILE).write_text(step_dir_name(30))  # a pointer at a partial save
    assert find_latest(tmp_path).name == step_dir_name(20)
    (checkpoint_root(tmp_path) / LATEST_FILE).write_text(step_dir_name(10))
    assert find_latest(tmp_path).name == step_dir_name(10)  # the pointer wins when it is whole


def test_prune_keeps_the_newest_and_saves_in_progress(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)  # newer than every whole one: maybe still being written
    fake_checkpoint(tmp_path, 0, complete=False)  # an old interrupted save
    prune(checkpoint_root(tmp_path), keep_last=2)
    left = sorted(p.name for p in checkpoint_root(tmp_path).iterdir())
    assert left == [step_dir_name(3), step_dir_name(4), step_dir_name(5)]


def test_resume_modes(tmp_path):
    cfg = load_config("tiny_digits")
    fake_checkpoint(tmp_path, 7)
    assert resolve_resume(cfg, tmp_path).name == step_dir_name(7)
    assert resolve_resume(load_config("tiny_digits", ["checkpoint.resume=none"]), tmp_path) is None
    explicit = load_config("tiny_digits", [f"checkpoint.resume={tmp_path}"])  # a run directory
    assert resolve_resume(explicit, tmp_path / "elsewhere").name == step_dir_name(7)
    partial = fake_checkpoint(tmp_path, 8, complete=False)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_resume(load_config("tiny_digits", [f"checkpoint.resume={partial}"]), tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume(load_config("tiny_digits", [f"checkpoint.resume={tmp_path / 'nope'}"]), tmp_path)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]

"""clmae.checkpoint in one process: finding the newest whole checkpoint, pruning, resume resolution (the
formats users bring to checkpoint.init_from are tested in tests/test_weights.py)."""

from __future__ import annotations

import dataclasses
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


# --------------------------------------------------------------------------------------------------
# Integrity: the manifest (issue 18, section 2)
# --------------------------------------------------------------------------------------------------


def manifested_checkpoint(run_dir, step: int, keep_last: int = 5):
    """A step directory laid out like a 2-rank save, committed (manifest, COMPLETE, latest) by the real code."""
    from clmae.checkpoint import _commit

    path = checkpoint_root(run_dir) / step_dir_name(step)
    (path / "mae" / "state").mkdir(parents=True)
    (path / "rng").mkdir()
    (path / "mae" / "state" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 64)
    for rank in (0, 1):
        (path / "mae" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 9000)
        (path / "rng" / f"rank_{rank:05d}.pt").write_bytes(b"r" * 100)
    (path / "client_state.json").write_text(json.dumps({"global_step": step}))
    _commit(path, [{}], keep_last=keep_last)
    return path


def test_manifest_lists_every_file_and_complete_holds_its_hash(tmp_path):
    import hashlib

    from clmae.checkpoint import MANIFEST_FILE, verify_checkpoint

    path = manifested_checkpoint(tmp_path, 4)
    manifest_text = (path / MANIFEST_FILE).read_text()
    files = json.loads(manifest_text)["files"]
    assert sorted(files) == [
        "client_state.json",
        "mae/state/mp_rank_00_model_states.pt",
        "mae/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "mae/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng/rank_00000.pt",
        "rng/rank_00001.pt",
    ]
    shard = path / "mae/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert files["mae/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == {
        "size": 9000,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }
    marker = (path / COMPLETE_MARKER).read_text().split()
    assert marker == [MANIFEST_FILE, "sha256", hashlib.sha256(manifest_text.encode()).hexdigest()]
    report = verify_checkpoint(path)
    assert report.verified and report.files == 6 and report.bytes == 16384 + 2 * 9000 + 200 + len('{"global_step": 4}')


@pytest.mark.parametrize(
    ("damage", "mode", "message"),
    [
        ("truncate", "size", r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: 4000 bytes, the manifest says 9000"),
        ("flip", "full", r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: content altered \(sha256 differs"),
        ("delete", "size", r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing"),
        ("manifest", "size", r"MANIFEST\.json: altered"),
    ],
)
def test_verify_names_the_damaged_file(tmp_path, damage, mode, message):
    from clmae.checkpoint import MANIFEST_FILE, CheckpointIntegrityError, verify_checkpoint

    path = manifested_checkpoint(tmp_path, 4)
    shard = path / "mae/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        with open(shard, "r+b") as handle:
            handle.truncate(4000)
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[1234] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        manifest["files"]["mae/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]["size"] = 4000
        (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(CheckpointIntegrityError, match=message):
        verify_checkpoint(path, mode)
    if damage == "flip":  # a flipped bit keeps the size: only a full check sees it
        assert verify_checkpoint(path, "size").verified


def test_resume_falls_back_past_a_damaged_checkpoint_and_sets_it_aside(tmp_path):
    from clmae.checkpoint import CheckpointIntegrityError

    manifested_checkpoint(tmp_path, 2)
    newest = manifested_checkpoint(tmp_path, 4)
    with open(newest / "mae/state/mp_rank_00_model_states.pt", "r+b") as handle:
        handle.truncate(10)
    cfg = load_config("tiny_digits")
    assert resolve_resume(cfg, tmp_path).name == step_dir_name(2)
    names = sorted(p.name for p in checkpoint_root(tmp_path).iterdir())
    assert names[0].startswith(f"damaged_{step_dir_name(4)}.") and names[1:] == [LATEST_FILE, step_dir_name(2)]
    # An explicit step directory that fails its manifest is refused, never replaced by another.
    damaged = checkpoint_root(tmp_path) / names[0]
    (damaged.with_name(step_dir_name(4))).symlink_to(damaged)
    explicit = load_config("tiny_digits", [f"checkpoint.resume={checkpoint_root(tmp_path) / step_dir_name(4)}"])
    with pytest.raises(CheckpointIntegrityError, match=r"mp_rank_00_model_states\.pt: 10 bytes"):
        resolve_resume(explicit, tmp_path)


def test_a_checkpoint_from_before_manifests_is_accepted_unverified(tmp_path):
    from clmae.checkpoint import verify_checkpoint

    report = verify_checkpoint(fake_checkpoint(tmp_path, 3))
    assert not report.verified and report.files == 0


def test_a_checkpoint_from_before_the_cheaper_curriculum_keys_resumes_as_it_trained(tmp_path):
    """A checkpoint whose config has curriculum.smooth and none of masking.cmm_every / cmm_batch_fraction (as
    clmae wrote them before those keys) resumes under today's equivalent config, and only under it."""
    from clmae.checkpoint import ClientState, check_compatible
    from clmae.config import ConfigError
    from clmae.weights import checkpoint_config

    def written_before(smooth: bool) -> ClientState:
        config = load_config("tiny_digits").to_dict()
        del config["masking"]["cmm_every"], config["masking"]["cmm_batch_fraction"]
        del config["curriculum"]["granularity"]
        config["curriculum"]["smooth"] = smooth
        return ClientState(epoch=0, step_in_epoch=3, global_step=3, world_size=2, mlflow_run_id=None, config=config)

    check_compatible(written_before(False), load_config("tiny_digits"), tmp_path)
    check_compatible(written_before(True), load_config("tiny_digits", ["curriculum.granularity=step"]), tmp_path)
    with pytest.raises(ConfigError, match=r"curriculum.granularity: checkpoint 'step' != now 'epoch'"):
        check_compatible(written_before(True), load_config("tiny_digits"), tmp_path)
    with pytest.raises(ConfigError, match=r"masking.cmm_every: checkpoint 1 != now 2"):
        check_compatible(written_before(False), load_config("tiny_digits", ["masking.cmm_every=2"]), tmp_path)
    # clmae-export and clmae-eval read the same checkpoint's config as it trained.
    step_dir = fake_checkpoint(tmp_path, 3)
    (step_dir / "client_state.json").write_text(json.dumps(dataclasses.asdict(written_before(True))))
    saved = checkpoint_config(step_dir)
    assert (saved.curriculum.granularity, saved.masking.cmm_every, saved.masking.cmm_batch_fraction) == ("step", 1, 1.0)

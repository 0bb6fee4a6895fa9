"""Where weights come from: weight files and checkpoints read strictly (clmae/weights.py). Reading a ZeRO
checkpoint of a real run is tested in tests/test_export.py and tests/test_viz.py."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from clmae.checkpoint import CheckpointError
from clmae.config import load_config
from clmae.masking import build_models
from clmae.weights import load_mae_weights


@pytest.fixture
def trained_mae():
    torch.manual_seed(3)
    mae, _ = build_models(load_config("tiny_digits"))
    return mae


def test_init_from_an_official_style_mae_pth(tmp_path, trained_mae):
    # facebookresearch/mae saves {"model": ..., "args": Namespace, "epoch": ...}.
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": trained_mae.state_dict(), "args": argparse.Namespace(lr=1e-3), "epoch": 799}, path)
    fresh, _ = build_models(load_config("tiny_digits"))
    load_mae_weights(fresh, path)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained_mae.state_dict().values(), strict=True)
    )


def test_init_from_safetensors(tmp_path, trained_mae):
    path = tmp_path / "mae.safetensors"
    save_file({k: v.contiguous() for k, v in trained_mae.state_dict().items()}, path)
    fresh, _ = build_models(load_config("tiny_digits"))
    load_mae_weights(fresh, path)
    assert torch.equal(fresh.decoder_pred.weight, trained_mae.decoder_pred.weight)


def test_init_from_refuses_what_does_not_fit(tmp_path, trained_mae):
    fresh, _ = build_models(load_config("tiny_digits"))
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"model": trained_mae.encoder_state_dict()}, encoder_only)
    with pytest.raises(CheckpointError, match="an encoder-only file cannot start the decoder"):
        load_mae_weights(fresh, encoder_only)
    other_size, _ = build_models(load_config("tiny_digits", ["model.img_size=48"]))
    resized = tmp_path / "resized.pth"
    torch.save(other_size.state_dict(), resized)
    with pytest.raises(CheckpointError, match=r"shape mismatch: pos_embed \(1, 145, 128\) vs \(1, 65, 128\)"):
        load_mae_weights(fresh, resized)
    pickled = tmp_path / "pickled.pth"
    torch.save(
        {"model": trained_mae.state_dict(), "optimizer": torch.optim.SGD(trained_mae.parameters(), lr=1)}, pickled
    )
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_mae_weights(fresh, pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_mae_weights(fresh, tmp_path / "absent.pth")

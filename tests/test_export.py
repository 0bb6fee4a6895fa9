"""clmae-export: ZeRO-2 and ZeRO-3 checkpoints of 2 real ranks -> timm state dicts that load strict and give
the training-time encoder's features; the printed snippet runs as printed; files are never overwritten."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from clmae.checkpoint import find_latest, read_client_state
from clmae.config import build_config
from clmae.export import _main as export_main
from clmae.masking import build_models
from clmae.specs import timm_encoder_kwargs
from clmae.weights import consolidated_state_dict, load_encoder, load_mae_weights
from tests.conftest import PRETRAIN_IMG_SIZE

pytestmark = pytest.mark.distributed


def training_time_models(run_dir):
    """The run's MAE and CMM as training built them, with the checkpoint's consolidated weights."""
    step_dir = find_latest(run_dir)
    cfg = build_config(read_client_state(step_dir).config)
    mae, cmm = build_models(cfg)
    load_mae_weights(mae, step_dir)
    cmm.load_state_dict(consolidated_state_dict(step_dir, "cmm"), strict=True)
    return mae.eval(), cmm


@pytest.mark.parametrize(("stage", "suffix"), [("zero2", ".safetensors"), ("zero3", ".pth")])
def test_export_loads_strict_into_timm_with_training_features(pretrained_runs, tmp_path, stage, suffix):
    out = tmp_path / f"encoder{suffix}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_main([str(pretrained_runs[stage]), "--out", str(out)]) == 0
    text = printed.getvalue()
    assert "timm model: vit_tiny_patch16_224" in text

    # The snippet the user is told to paste, run as printed: it loads strict=True and runs a forward.
    snippet = text[text.index("import timm") :]
    namespace: dict = {}
    exec(snippet, namespace)
    exported = namespace["model"].eval()
    assert namespace["features"].shape == (1, 128)

    mae, _ = training_time_models(pretrained_runs[stage])
    size = PRETRAIN_IMG_SIZE
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mae.forward_encoder(mae.embed_patches(images))  # (4, 1 + 16, 128), all patches visible
        got = exported.forward_features(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_all_writes_mae_and_cmm(pretrained_runs, tmp_path):
    out = tmp_path / "clmae.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([str(pretrained_runs["zero2"]), "--out", str(out), "--what", "all"]) == 0
    mae, cmm = training_time_models(pretrained_runs["zero2"])

    encoder = timm.create_model(**timm_encoder_kwargs("vit_tiny", PRETRAIN_IMG_SIZE))
    encoder.load_state_dict(load_file(out), strict=True)
    # The full MAE file is what checkpoint.init_from reads; the CMM file loads strict into the module.
    fresh_mae, fresh_cmm = build_models(build_config(read_client_state(find_latest(pretrained_runs["zero2"])).config))
    load_mae_weights(fresh_mae, tmp_path / "clmae_mae.safetensors")
    fresh_cmm.load_state_dict(load_file(tmp_path / "clmae_cmm.safetensors"), strict=True)
    for key, value in mae.state_dict().items():
        torch.testing.assert_close(fresh_mae.state_dict()[key], value, rtol=0, atol=0)
    for key, value in cmm.state_dict().items():
        torch.testing.assert_close(fresh_cmm.state_dict()[key], value, rtol=0, atol=0)

    # An exported file is a checkpoint too: evaluation reads its architecture and provenance back.
    source = load_encoder(out)
    assert (source.model_name, source.img_size) == ("vit_tiny", PRETRAIN_IMG_SIZE)
    assert source.pretrain_run_id == read_client_state(find_latest(pretrained_runs["zero2"])).mlflow_run_id


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clmae.export", *args], capture_output=True, text=True, timeout=300)


def test_export_refuses_to_overwrite_and_missing_checkpoints(pretrained_runs, tmp_path):
    existing = tmp_path / "encoder.safetensors"
    existing.write_bytes(b"keep me")
    refused = run_cli(str(pretrained_runs["zero2"]), "--out", str(existing))
    missing = run_cli(str(tmp_path / "no_such_run"), "--out", str(tmp_path / "x.pth"))
    not_a_checkpoint = run_cli(str(tmp_path), "--out", str(tmp_path / "y.pth"))
    for result, words in [
        (refused, "exists; pass --overwrite"),
        (missing, "no such checkpoint"),
        (not_a_checkpoint, "not a clmae checkpoint"),
    ]:
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()


def test_safetensors_metadata_alone_builds_the_timm_model(pretrained_runs, tmp_path):
    """A user with only the file: its metadata holds the complete timm.create_model arguments."""
    import json

    from safetensors import safe_open

    out = tmp_path / "encoder.safetensors"
    assert export_main([str(pretrained_runs["zero2"]), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        kwargs = json.loads(handle.metadata()["timm.create_model_kwargs"])
    assert kwargs == timm_encoder_kwargs("vit_tiny", PRETRAIN_IMG_SIZE)
    model = timm.create_model(**kwargs)
    model.load_state_dict(load_file(str(out)), strict=True)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeeds_own_zero_to_fp32_opens_each_engine_directory_without_flags(pretrained_runs, tmp_path, stage):
    """DeepSpeed's recovery script, as it copies it into every engine directory, run with no `--tag`."""
    step_dir = find_latest(pretrained_runs[stage])
    for engine in ("mae", "cmm"):
        script = step_dir / engine / "zero_to_fp32.py"
        out = tmp_path / stage / engine
        result = subprocess.run(
            [sys.executable, str(script), str(step_dir / engine), str(out), "--safe_serialization"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        recovered = load_file(str(out / "model.safetensors"))
        expected = consolidated_state_dict(step_dir, engine)
        assert recovered.keys() == expected.keys()
        assert all(torch.equal(recovered[k].float(), expected[k]) for k in expected)


def test_vit_base_patch8_checkpoint_exports_and_loads_strict_into_timm(digits, tmp_path):
    """The reference's second model through the whole path: clmae-pretrain writes a real ViT-B/8 checkpoint
    (vitb8_reference: both engines, one optimiser step on one process, at 32 px so the step is cheap; the
    size changes only the number of position embeddings), clmae-export consolidates it, and the file's
    metadata alone builds timm's vit_base_patch8_224 that loads it strict."""
    import json
    import os

    from safetensors import safe_open

    args = [
        sys.executable, "-m", "clmae.train", "--config", "vitb8_reference",
        f"run.output_dir={tmp_path}", "run.name=b8",
        f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}",
        "model.img_size=32", "data.batch_size=2", "train.accum_steps=1", "data.num_workers=1",
        "data.os_cache=false", "train.ds_config=zero2_fp32", "train.stop_at_step=1", "loss.kl_reference_batch=null",
        "tracking.enabled=false", "tracking.mask_images_every_epochs=0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI")}
    trained = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(env, OMP_NUM_THREADS="1"))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    out = tmp_path / "b8.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([str(tmp_path / "b8"), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        kwargs = json.loads(handle.metadata()["timm.create_model_kwargs"])
    assert kwargs == timm_encoder_kwargs("vit_base_patch8", 32)
    assert (kwargs["model_name"], kwargs["patch_size"], kwargs["embed_dim"], kwargs["depth"]) == (
        "vit_base_patch8_224", 8, 768, 12
    )
    model = timm.create_model(**kwargs)
    model.load_state_dict(load_file(str(out)), strict=True)
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 1 + 16, 768)

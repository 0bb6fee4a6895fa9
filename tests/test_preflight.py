"""Bad input never reaches a traceback (issue 18, section 4): every console script, given a path that exists
but is not what it should be, or a config value that cannot work with the chosen model, prints one line
naming the key or path and exits with code 2, before any rank starts (no process group, no run directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clmae.config import load_config
from clmae.preflight import check_model_geometry, check_schedule


def bad_files(root: Path, digits: Path) -> dict[str, Path]:
    """One of each kind of wrong file."""
    root.mkdir(exist_ok=True)
    files = {"empty": root / "empty.beton", "text": root / "notes.beton", "dir": root / "a_directory"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("these are not images\n" * 100)
    files["dir"].mkdir(exist_ok=True)
    beton = (digits / "train.beton").read_bytes()
    files["truncated"] = root / "truncated.beton"
    files["truncated"].write_bytes(beton[: len(beton) // 2])
    weights = {"w": torch.zeros(64, 64)}
    torch.save(weights, root / "whole.pth")
    files["truncated_pth"] = root / "truncated.pth"
    files["truncated_pth"].write_bytes((root / "whole.pth").read_bytes()[:3000])
    files["empty_pth"] = root / "empty.pth"
    files["empty_pth"].write_bytes(b"")
    from safetensors.torch import save_file

    save_file(weights, root / "whole.safetensors")
    files["truncated_safetensors"] = root / "truncated.safetensors"
    files["truncated_safetensors"].write_bytes((root / "whole.safetensors").read_bytes()[:5000])
    files["beton_as_config"] = root / "config.yaml"
    files["beton_as_config"].write_bytes(beton[:4096])
    files["list_config"] = root / "list.yaml"
    files["list_config"].write_text("- a\n- b\n")
    files["image"] = root / "picture.txt"
    files["image"].write_text("not a picture")
    files["no_checkpoint_dir"] = root / "empty_run"
    files["no_checkpoint_dir"].mkdir(exist_ok=True)
    return files


@pytest.fixture(scope="module")
def bad(tmp_path_factory, digits):
    return bad_files(tmp_path_factory.mktemp("bad"), digits)


def pretrain(tmp_path: Path, digits: Path, *overrides: str, config: str = "tiny_digits") -> list[str]:
    return [
        "clmae.train", "--config", config, f"run.output_dir={tmp_path / 'runs'}",
        f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}", *overrides,
    ]  # fmt: skip


# (command builder, expected message): the first line of stderr must be "error: " + a match of it.
CASES = {
    # configs
    "config is binary": (lambda t, d, b: ["clmae.train", "--config", str(b["beton_as_config"])], r"not a YAML config"),
    "config is a list": (lambda t, d, b: ["clmae.train", "--config", str(b["list_config"])], r"must be a mapping"),
    "config is a directory": (lambda t, d, b: ["clmae.train", "--config", f"{b['dir']}/"], r"is not a file"),
    # config values that cannot work with the model
    "mask leaves no patch visible": (
        lambda t, d, b: pretrain(t, d, "model.mask_ratio=0.99"),
        r"'model\.mask_ratio': 0\.99 leaves 0 of 64 patches visible",
    ),
    "image not divisible by patch": (
        lambda t, d, b: pretrain(t, d, "model.img_size=30"),
        r"'model\.img_size': 30 is not a multiple of vit_tiny's patch size 4",
    ),
    "heads do not divide width": (
        lambda t, d, b: pretrain(t, d, "masking.cmm_heads=3"),
        r"'masking\.cmm_heads': 3 does not divide the masking module's width 128",
    ),
    "batch size zero": (lambda t, d, b: pretrain(t, d, "data.batch_size=0"), r"'data\.batch_size': 0 must be >= 1"),
    "keep_last zero": (lambda t, d, b: pretrain(t, d, "checkpoint.keep_last=0"), r"'checkpoint\.keep_last'"),
    "verify mode unknown": (lambda t, d, b: pretrain(t, d, "checkpoint.verify=fast"), r"'checkpoint\.verify'"),
    # data files
    "train data empty": (
        lambda t, d, b: pretrain(t, d, f"data.train_path={b['empty']}"),
        r"data\.train_path: .*empty\.beton is empty",
    ),
    "train data is text": (
        lambda t, d, b: pretrain(t, d, f"data.train_path={b['text']}"),
        r"data\.train_path: .*notes\.beton is not a readable \.beton",
    ),
    "train data truncated": (
        lambda t, d, b: pretrain(t, d, f"data.train_path={b['truncated']}"),
        r"data\.train_path: .*truncated\.beton .*(truncated|not a readable)",
    ),
    "train data is a directory": (
        lambda t, d, b: pretrain(t, d, f"data.train_path={b['dir']}"),
        r"data\.train_path: .*a_directory is not a file",
    ),
    "val data truncated (mask pictures on)": (
        lambda t, d, b: pretrain(t, d, f"data.val_path={b['truncated']}", "tracking.mask_images_every_epochs=1"),
        r"data\.val_path: .*truncated\.beton",
    ),
    # weights for init_from
    "init_from truncated pth": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.init_from={b['truncated_pth']}"),
        r"checkpoint\.init_from: .*truncated\.pth is not a valid \.pth weights file",
    ),
    "init_from empty pth": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.init_from={b['empty_pth']}"),
        r"checkpoint\.init_from: .*empty\.pth is not a valid \.pth weights file",
    ),
    "init_from truncated safetensors": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.init_from={b['truncated_safetensors']}"),
        r"checkpoint\.init_from: .*truncated\.safetensors is not a valid \.safetensors weights file",
    ),
    "init_from a data file": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.init_from={b['text']}"),
        r"checkpoint\.init_from: .*notes\.beton is not a weights file",
    ),
    "init_from a directory without checkpoints": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.init_from={b['no_checkpoint_dir']}"),
        r"checkpoint\.init_from: .*empty_run is a directory with no complete clmae checkpoint",
    ),
    "resume from a file": (
        lambda t, d, b: pretrain(t, d, f"checkpoint.resume={b['text']}"),
        r"checkpoint\.resume: .*notes\.beton is not a directory",
    ),
    # output directory
    "output_dir is a file": (
        lambda t, d, b: pretrain(t, d, f"run.output_dir={b['text']}"),
        r"run\.output_dir: .*notes\.beton exists and is not a directory",
    ),
    # clmae-export / clmae-eval / clmae-viz checkpoints
    "eval of a truncated weights file": (
        lambda t, d, b: ["clmae.evaluate", "knn", str(b["truncated_safetensors"])],
        r"checkpoint: .*truncated\.safetensors is not a valid \.safetensors weights file",
    ),
    "export of a directory without checkpoints": (
        lambda t, d, b: ["clmae.export", str(b["no_checkpoint_dir"]), "--out", str(t / "x.safetensors")],
        r"empty_run: not a clmae checkpoint",
    ),
    "viz of a data file": (
        lambda t, d, b: ["clmae.viz", "masks", str(b["text"]), "--images", str(b["image"]), "--out", str(t / "x.png")],
        r"notes\.beton: not a clmae checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, bad, digits, tmp_path):
    build, message = CASES[case]
    result = subprocess.run(
        [sys.executable, "-m", *build(tmp_path, digits, bad)], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written: no run directory, no MLflow store


@pytest.mark.parametrize("model", ["vit_tiny", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"])
def test_every_shipped_geometry_passes_and_a_mask_hiding_every_patch_is_refused(model):
    from clmae.config import ConfigError

    cfg = load_config(None, [f"model.name={model}"])
    check_model_geometry(cfg)
    check_schedule(cfg)
    patches = {"vit_tiny": 64, "vit_base_patch16": 196, "vit_large_patch16": 196, "vit_huge_patch14": 256}[model]
    with pytest.raises(ConfigError, match=rf"leaves 0 of {patches} patches visible"):
        check_model_geometry(load_config(None, [f"model.name={model}", f"model.mask_ratio={1 - 0.5 / patches}"]))


def test_a_warmup_longer_than_training_is_a_warning_not_an_error(capsys):
    """A short run of a long recipe (train.epochs=1 with a 2-epoch warmup) is legal: it only warns."""
    check_schedule(load_config("tiny_digits", ["train.epochs=1", "optim.warmup_epochs=5"]))
    assert "warning: config key 'optim.warmup_epochs': 5 is longer than train.epochs=1" in capsys.readouterr().err


def test_the_damaged_weight_files_are_unreadable_by_torch_too(bad):
    """The fixtures fail for the reason the tests name: torch itself cannot read them."""
    for name in ("truncated_pth", "empty_pth"):
        with pytest.raises((RuntimeError, EOFError)):
            torch.load(bad[name], weights_only=True)

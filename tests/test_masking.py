"""Masking strategies (clmae/masking.py): the registry, and a strategy defined outside clmae
(tests/masking_plugins.py) trained end to end through the real `clmae-pretrain` on 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from clmae.checkpoint import CheckpointError, find_latest
from clmae.config import ConfigError, load_config
from clmae.export import export
from clmae.masking import (
    STRATEGIES,
    CurriculumMasking,
    RandomMasking,
    build_models,
    build_strategy,
    iteration_flops,
    masking_batch_size,
    masking_images,
    masking_step_due,
    strategy_class,
)
from clmae.preflight import check_pretrain
from tests.masking_plugins import CentreMasking

PLUGIN = "tests.masking_plugins:CentreMasking"


def test_registry_names_the_two_strategies_and_refuses_others():
    assert STRATEGIES == {"random": RandomMasking, "curriculum": CurriculumMasking}
    # The name is checked where a strategy is built (the config is plain data), and by clmae-pretrain's preflight.
    with pytest.raises(ConfigError, match=r"'masking\.mode': unknown masking strategy 'saliency'; registered: "):
        build_strategy(load_config("tiny_digits", ["masking.mode=saliency"]))
    with pytest.raises(ConfigError, match=r"registered: curriculum, random"):
        check_pretrain(load_config("tiny_digits", ["masking.mode=tests.no_such_module:Masking"]))
    with pytest.raises(ConfigError, match=r"is not a clmae\.masking\.MaskingStrategy subclass"):
        build_strategy(load_config("tiny_digits", ["masking.mode=tests.masking_plugins:math"]))
    assert strategy_class(PLUGIN) is CentreMasking


def test_cmm_every_steps_on_the_first_iteration_then_one_in_k():
    every = load_config("tiny_digits", ["masking.cmm_every=3"])
    assert [step for step in range(1, 11) if masking_step_due(every, step)] == [1, 4, 7, 10]
    default = load_config("tiny_digits")
    assert all(masking_step_due(default, step) for step in range(1, 11))


@pytest.mark.parametrize(
    ("fraction", "batch", "used"),
    [(1.0, 16, 16), (0.5, 16, 8), (0.25, 64, 16), (0.1, 30, 3), (0.3, 5, 2), (0.5, 3, 2), (0.01, 16, 1)],
)
def test_cmm_batch_fraction_takes_the_first_images_rounded_half_up(fraction, batch, used):
    cfg = load_config("tiny_digits", [f"masking.cmm_batch_fraction={fraction}"])
    assert masking_batch_size(cfg, batch) == used
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 2, 2)
    assert torch.equal(masking_images(cfg, images), images[:used])
    if used == batch:
        assert masking_images(cfg, images) is images  # the paper's step gets the very tensor, untouched


@pytest.mark.parametrize(
    "value", ["masking.cmm_every=0", "masking.cmm_batch_fraction=0", "masking.cmm_batch_fraction=1.5"]
)
def test_cheaper_curriculum_settings_out_of_range_are_refused_by_key(value):
    with pytest.raises(ConfigError, match=rf"'{value.split('=')[0]}'"):
        load_config("tiny_digits", [value])


def test_iteration_flops_count_the_cmm_step_by_its_share_of_iterations_and_images():
    base = ["data.batch_size=16"]
    paper = iteration_flops(load_config("tiny_digits", base))
    every = iteration_flops(load_config("tiny_digits", [*base, "masking.cmm_every=4"]))
    part = iteration_flops(load_config("tiny_digits", [*base, "masking.cmm_batch_fraction=0.25"]))
    both = iteration_flops(load_config("tiny_digits", [*base, "masking.cmm_every=2", "masking.cmm_batch_fraction=0.5"]))
    assert paper["cmm"] > 0
    # The MAE step (which runs the CMM forward to choose its masks) is the same every iteration.
    assert every["mae"] == part["mae"] == both["mae"] == paper["mae"]
    assert every["cmm"] == part["cmm"] == both["cmm"] == pytest.approx(paper["cmm"] / 4, rel=1e-12)


def test_plugin_strategy_masks_the_mae_step():
    torch.manual_seed(0)
    cfg = load_config("tiny_digits", [f"masking.mode={PLUGIN}", "model.mask_ratio=0.75"])
    mae, module = build_models(cfg)
    assert module is None
    strategy = strategy_class(PLUGIN)(cfg)
    _, mask, _ = mae(torch.randn(3, 3, 32, 32), strategy.scorer(None))
    visible = (mask[0] == 0).view(8, 8)
    assert torch.equal(mask[0], mask[2]) and visible.sum() == 16
    assert visible[2:6, 2:6].all(), "the 16 visible patches of an 8x8 grid are its centre 4x4"


@pytest.mark.distributed
def test_plugin_strategy_trains_through_clmae_pretrain(tmp_path, digits):
    """torchrun, 2 ranks, the `clmae-pretrain` console script: the MAE step takes the plugin's masks (its
    scorer saw every image), its metric and console part are logged, and it owns no module to save or export."""
    run_dir = tmp_path / "centre"
    script = Path(sys.executable).parent / "clmae-pretrain"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
        "--config", "tiny_digits", f"masking.mode={PLUGIN}",
        f"run.output_dir={tmp_path}", f"run.name={run_dir.name}",
        f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}",
        "data.batch_size=16", "train.epochs=2", "train.stop_at_step=3", "train.log_every=1",
        "checkpoint.every_steps=3", "tracking.system_metrics=false", "tracking.mask_images_every_epochs=0",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"({PLUGIN} masking)" in output
    assert "centre masks on 16 images" in output  # the strategy's `report`, per rank's batch

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    scored = client.get_metric_history(run.info.run_id, "centre/images_scored")
    assert sorted((m.step, m.value) for m in scored) == [(1, 16.0), (2, 16.0), (3, 16.0)]
    assert client.get_metric_history(run.info.run_id, "cmm/loss_cmm") == []

    step_dir = find_latest(run_dir)
    assert sorted(p.name for p in step_dir.iterdir() if (p / "state").is_dir()) == ["mae"]
    with pytest.raises(CheckpointError, match=f"masking.mode={PLUGIN} trains no masking module"):
        export(run_dir, tmp_path / "cmm.safetensors", what="cmm")
    written, _ = export(run_dir, tmp_path / "encoder.safetensors")
    assert written["encoder"].is_file()

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

"""Config: defaults < experiment file < dotted overrides; every error path names the key."""

import subprocess
import sys

import pytest
import yaml

from clmae.config import (
    CONFIG_DIR,
    ConfigError,
    available_configs,
    build_config,
    config_hash,
    load_config,
    read_yaml,
    save_config,
)


def test_defaults_alone_cover_every_schema_key():
    cfg = load_config()
    assert cfg.model.name == "vit_base_patch16"
    assert cfg.model.mask_ratio == 0.75
    assert cfg.loss.w_div == 2.0
    assert cfg.data.crop_scale == (0.2, 1.0)


def test_every_shipped_config_loads():
    names = available_configs()
    assert "defaults" in names and "tiny_digits" in names
    for name in names:
        load_config(name)


def test_reference_recipe_is_the_reference_codes_regime_and_each_config_names_its_recipe():
    cfg = load_config("vitb_reference")
    assert (cfg.model.name, cfg.model.norm_pix_loss, cfg.optim.base_lr) == ("vit_base_patch16", False, 1e-3)
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs, cfg.optim.clip_grad) == (256, 200, 40, 0)
    assert (cfg.loss.kl_reduction, cfg.loss.kl_reference_batch) == ("sum", cfg.data.batch_size)
    for name in available_configs():
        if name != "defaults":
            header = (CONFIG_DIR / f"{name}.yaml").read_text().split("\nrun:")[0]
            assert "recipe" in header.lower(), name
            # The declared batch is the config's own: none of them warns as shipped.
            cfg = load_config(name)
            assert cfg.loss.kl_reference_batch == cfg.data.batch_size, name


def test_experiment_file_then_overrides_take_precedence(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("model:\n  name: vit_tiny\n  mask_ratio: 0.6\nloss:\n  w_kl: 0.5\n")
    cfg = load_config(exp, ["model.mask_ratio=0.8", "data.batch_size=7"])
    assert cfg.model.name == "vit_tiny"  # from the experiment file
    assert cfg.model.mask_ratio == 0.8  # override beats the experiment file
    assert cfg.loss.w_kl == 0.5
    assert cfg.data.batch_size == 7
    assert cfg.loss.w_gauss == 1.0  # untouched default


def test_shipped_config_by_name_and_by_path_agree():
    assert load_config("tiny_digits") == load_config(CONFIG_DIR / "tiny_digits.yaml")


@pytest.mark.parametrize(
    ("override", "value"),
    [("loss.w_kl=1e-3", 1e-3), ("loss.w_kl=1.5e-4", 1.5e-4), ("loss.w_kl=2", 2.0), ("loss.w_kl=0", 0.0)],
)
def test_float_keys_accept_every_numeric_spelling(override, value):
    # YAML 1.1 reads `1e-3` as a string; a float key must still take it.
    cfg = load_config(None, [override])
    assert cfg.loss.w_kl == value and isinstance(cfg.loss.w_kl, float)


def test_unknown_key_suggests_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.w_kll' \(did you mean 'loss\.w_kl'\?\)"):
        load_config(None, ["loss.w_kll=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle' \(did you mean 'model'\?\)"):
        load_config(None, ["modle.name=vit_tiny"])


def test_unknown_key_in_experiment_file_is_named(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("data:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"'data\.batchsize' \(did you mean 'data\.batch_size'\?\)"):
        load_config(exp)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", r"'data\.batch_size': expected int, got 'abc' \(str\)"),
        ("data.batch_size=2.5", r"'data\.batch_size': expected int, got 2\.5 \(float\)"),
        ("model.norm_pix_loss=3", r"'model\.norm_pix_loss': expected bool, got 3 \(int\)"),
        ("loss.w_kl=heavy", r"'loss\.w_kl': expected float, got 'heavy' \(str\)"),
        ("model.name=vit_giant", r"'model\.name': expected one of 'vit_tiny', .*got 'vit_giant'"),
        ("model.img_size=big", r"'model\.img_size': expected int or null, got 'big'"),
        ("data.crop_scale=[0.2]", r"'data\.crop_scale': expected tuple\[float, float\], got \[0\.2\]"),
        ("data.crop_scale=[0.2, x]", r"'data\.crop_scale\[1\]': expected float, got 'x'"),
        ("model=3", r"'model': expected a mapping, got 3"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "model.mask_ratio=1.0",
        "model.mask_ratio=0",
        "data.batch_size=0",
        "loss.gauss_sigma=-1",
        "data.crop_scale=[0.9,0.2]",
        "run.seed=-1",
        "loss.div_scale=0",
        "optim.betas=[0.9, 1.0]",
        "cmm_optim.betas=[-0.1, 0.9]",
        "tracking.experiment=' '",
        "train.log_every=0",
        "train.epochs=0",
        "checkpoint.keep_last=0",
    ],
)
def test_out_of_range_values_are_refused_by_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["novalue", "=3", "model..name=x", "model.name"])
def test_malformed_override_is_refused(override):
    with pytest.raises(ConfigError, match=r"not of the form section\.key=value"):
        load_config(None, [override])


def test_missing_key_is_named():
    data = read_yaml(CONFIG_DIR / "defaults.yaml")
    del data["loss"]["w_div"]
    with pytest.raises(ConfigError, match=r"missing config key\(s\): loss\.w_div"):
        build_config(data)


def test_unknown_config_name_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"no shipped config named 'tiny_digit' \(did you mean 'tiny_digits'\?\)"):
        load_config("tiny_digit")
    with pytest.raises(ConfigError, match="config file not found: "):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_saved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config("tiny_digits", ["loss.w_div=0"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    reloaded = build_config(yaml.safe_load(path.read_text()))
    assert reloaded == cfg
    assert config_hash(reloaded) == config_hash(cfg)
    assert config_hash(cfg) != config_hash(load_config("tiny_digits"))
    assert config_hash(cfg, ["model"]) == config_hash(load_config("tiny_digits"), ["model"])
    assert cfg.flat()["loss.w_div"] == 0.0


def test_pretrain_cli_prints_merged_config_and_reports_errors_in_one_line():
    ok = subprocess.run(
        [sys.executable, "-m", "clmae.train", "--config", "tiny_digits", "loss.w_kl=0.2", "--print-config"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["model"]["name"] == "vit_tiny" and printed["loss"]["w_kl"] == 0.2

    bad = subprocess.run(
        [sys.executable, "-m", "clmae.train", "--config", "tiny_digits", "loss.w_kll=0.2", "--print-config"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown config key 'loss.w_kll' (did you mean 'loss.w_kl'?)"


def test_cmm_optimiser_inherits_unset_keys_from_the_mae_optimiser():
    cfg = load_config("tiny_digits", ["cmm_optim.base_lr=5e-4", "cmm_optim.betas=[0.5, 0.9]"])
    resolved = cfg.cmm_optim_resolved()
    assert resolved.base_lr == 5e-4 and resolved.betas == (0.5, 0.9)
    assert resolved.weight_decay == cfg.optim.weight_decay == 0.05
    assert resolved.warmup_epochs == cfg.optim.warmup_epochs == 2.0
    with pytest.raises(ConfigError, match=r"config key 'cmm_optim\.clip_grad'"):
        load_config(None, ["cmm_optim.clip_grad=-1"])


def test_docs_configuration_lists_every_key_with_its_default():
    import re
    from pathlib import Path

    import yaml

    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    documented = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", page, re.MULTILINE))
    defaults = yaml.safe_load((Path(__file__).parent.parent / "clmae" / "configs" / "defaults.yaml").read_text())
    expected = {f"{section}.{key}" for section, keys in defaults.items() for key in keys}
    assert set(documented) == expected
    for key in expected:
        section, name = key.split(".")
        assert yaml.safe_load(documented[key]) == defaults[section][name], key

"""Run configuration: a typed schema, YAML defaults, experiment files and dotted CLI overrides.

Precedence, lowest first (DINOv2-style):
    clmae/configs/defaults.yaml  <  experiment file (by name or path)  <  `key.sub=value` overrides

The schema below declares each key's type; `defaults.yaml` holds every key's value with a comment
saying what it does. The merged, validated config is the single source of truth of a run: it is saved
next to the run's outputs (`config.yaml`) and logged as MLflow params.

Errors name the offending key: an unknown key suggests the closest valid one, a wrong type names the
key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clmae.curriculum import CURRICULUM_GRANULARITIES, CURRICULUM_SCHEDULES
from clmae.errors import ClmaeError
from clmae.specs import MODEL_NAMES

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS_NAME = "defaults"


class ConfigError(ClmaeError, ValueError):
    """A config file, key or value is invalid; the message names the key."""


# Keys that were renamed: old key -> (new key, old value -> new value). A config that still uses one is told
# what to write instead; a checkpoint that saved one is read in the new key (upgrade_saved).
RENAMED_KEYS = {"curriculum.smooth": ("curriculum.granularity", {True: "step", False: "epoch"})}
# Keys added since a checkpoint may have been written, at the value that does what clmae did before them.
ADDED_KEYS = {"masking.cmm_every": 1, "masking.cmm_batch_fraction": 1.0}


def upgrade_saved(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict that an earlier clmae saved (in a checkpoint), in today's keys: renamed keys mapped, added
    keys at the value that behaves as before. A run resumes, and a checkpoint exports, across an upgrade."""
    config = {section: dict(value) if isinstance(value, dict) else value for section, value in config.items()}
    for old, (new, values) in RENAMED_KEYS.items():
        (section, old_name), new_name = old.split("."), new.split(".")[1]
        if isinstance(config.get(section), dict) and old_name in config[section]:
            config[section][new_name] = values[config[section].pop(old_name)]
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if isinstance(config.get(section), dict):
            config[section].setdefault(name, value)
    return config


# --------------------------------------------------------------------------------------------------
# Schema. Types only: the values live in configs/defaults.yaml.
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str
    output_dir: str
    seed: int
    lock_timeout_seconds: float


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"]
    timeout_minutes: int
    step_timeout_s: float | None
    signal_grace_s: float


@dataclass
class ModelConfig:
    name: Literal[MODEL_NAMES]
    img_size: int | None
    mask_ratio: float
    norm_pix_loss: bool


@dataclass
class MaskingConfig:
    mode: str  # a registered strategy or `package.module:ClassName` (clmae/masking.py checks it)
    cmm_depth: int
    cmm_heads: int
    cmm_every: int  # the strategy's own step (the CMM's) on one iteration in cmm_every
    cmm_batch_fraction: float  # ... on this fraction of each micro-batch (its first images)


@dataclass
class LossConfig:
    w_gauss: float
    gauss_sigma: float
    w_kl: float
    kl_target: Literal["mask_ratio", "reference"]
    kl_reduction: Literal["sum", "mean"]
    kl_reference_batch: int | None
    w_div: float
    div_scale: float


@dataclass
class CurriculumConfig:
    schedule: Literal[CURRICULUM_SCHEDULES]
    granularity: Literal[CURRICULUM_GRANULARITIES]


@dataclass
class DataConfig:
    train_path: str
    val_path: str
    batch_size: int
    num_workers: int
    os_cache: bool
    crop_scale: tuple[float, float]
    eval_crop_ratio: float
    interpolation: Literal["bicubic", "area"]


@dataclass
class OptimConfig:
    base_lr: float
    min_lr: float
    weight_decay: float
    no_decay_names: tuple[str, ...]
    betas: tuple[float, float]
    warmup_epochs: float
    clip_grad: float


@dataclass
class CmmOptimConfig:
    """The curriculum masking module's optimiser; each null key takes the MAE's (`optim`) value."""

    base_lr: float | None
    min_lr: float | None
    weight_decay: float | None
    no_decay_names: tuple[str, ...] | None
    betas: tuple[float, float] | None
    warmup_epochs: float | None
    clip_grad: float | None


@dataclass
class TrainConfig:
    epochs: int
    accum_steps: int
    ds_config: str
    log_every: int
    peak_tflops: float | None
    stop_at_step: int | None
    on_nonfinite: Literal["rollback", "stop"]
    max_rollbacks: int
    rollback_skip_margin: int
    skip_steps: list[int]
    compile: bool


@dataclass
class CheckpointConfig:
    every_steps: int
    keep_last: int
    resume: str
    init_from: str | None
    verify: Literal["full", "size", "none"]
    allow_world_size_change: bool
    allow_global_batch_change: bool


@dataclass
class TrackingConfig:
    enabled: bool
    experiment: str
    uri: str | None
    mask_images_every_epochs: int
    system_metrics: bool


@dataclass
class Config:
    run: RunConfig
    dist: DistConfig
    model: ModelConfig
    masking: MaskingConfig
    loss: LossConfig
    curriculum: CurriculumConfig
    data: DataConfig
    optim: OptimConfig
    cmm_optim: CmmOptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    tracking: TrackingConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cmm_optim_resolved(self) -> OptimConfig:
        """The masking module's optimiser settings: its own where set, the MAE's elsewhere."""
        own = {k: v for k, v in dataclasses.asdict(self.cmm_optim).items() if v is not None}
        return dataclasses.replace(self.optim, **own)

    def flat(self) -> dict[str, Any]:
        """`{"optim.base_lr": 1e-3, ...}`: the shape MLflow params want."""
        return flatten(self.to_dict())


# Range checks that types cannot express: key -> (predicate, what it must be).
_RANGE_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.mask_ratio": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "model.img_size": (lambda v: v is None or v > 0, "a positive int or null"),
    "masking.cmm_depth": (lambda v: v >= 1, ">= 1"),
    "masking.cmm_heads": (lambda v: v >= 1, ">= 1"),
    "masking.cmm_every": (lambda v: v >= 1, ">= 1"),
    "masking.cmm_batch_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "loss.gauss_sigma": (lambda v: v > 0, "> 0"),
    "loss.w_gauss": (lambda v: v >= 0, ">= 0"),
    "loss.w_kl": (lambda v: v >= 0, ">= 0"),
    "loss.kl_reference_batch": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "loss.w_div": (lambda v: v >= 0, ">= 0"),
    "loss.div_scale": (lambda v: v > 0, "> 0"),
    "run.seed": (lambda v: v >= 0, ">= 0"),
    "run.lock_timeout_seconds": (lambda v: v > 0, "> 0"),
    "dist.timeout_minutes": (lambda v: v > 0, "> 0"),
    "dist.step_timeout_s": (lambda v: v is None or v >= 0, ">= 0 (0: no watchdog) or null (derived)"),
    "dist.signal_grace_s": (lambda v: v >= 0, ">= 0 (0: wait for the step boundary however long)"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.num_workers": (lambda v: v >= 1, ">= 1"),
    "data.crop_scale": (lambda v: 0 < v[0] <= v[1] <= 1, "two numbers 0 < low <= high <= 1"),
    "data.eval_crop_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.base_lr": (lambda v: v > 0, "> 0"),
    "optim.min_lr": (lambda v: v >= 0, ">= 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "optim.clip_grad": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "cmm_optim.betas": (lambda v: v is None or all(0 <= b < 1 for b in v), "two numbers in [0, 1), or null"),
    "cmm_optim.base_lr": (lambda v: v is None or v > 0, "> 0 or null"),
    "cmm_optim.min_lr": (lambda v: v is None or v >= 0, ">= 0 or null"),
    "cmm_optim.weight_decay": (lambda v: v is None or v >= 0, ">= 0 or null"),
    "cmm_optim.warmup_epochs": (lambda v: v is None or v >= 0, ">= 0 or null"),
    "cmm_optim.clip_grad": (lambda v: v is None or v >= 0, ">= 0 or null"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.accum_steps": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.peak_tflops": (lambda v: v is None or v > 0, "> 0 or null"),
    "train.stop_at_step": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "train.max_rollbacks": (lambda v: v >= 0, ">= 0"),
    "train.rollback_skip_margin": (lambda v: v >= 0, ">= 0"),
    "train.skip_steps": (lambda v: all(s >= 1 for s in v), "a list of global steps >= 1"),
    "checkpoint.every_steps": (lambda v: v >= 1, ">= 1"),
    "checkpoint.keep_last": (lambda v: v >= 1, ">= 1"),
    "tracking.mask_images_every_epochs": (lambda v: v >= 0, ">= 0 (0: never)"),
    "tracking.experiment": (lambda v: bool(v.strip()), "a non-empty name"),
}


# --------------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------------


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config by name (`tiny_digits`) or any YAML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise ConfigError(f"config file {what}: {path}")
        return path
    shipped = CONFIG_DIR / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(text, available_configs(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"no shipped config named '{text}'{hint}; available: {', '.join(available_configs())}; "
        "or pass a path to a .yaml file"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (binary content)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.base_lr=1.5e-4` -> (["optim", "base_lr"], 1.5e-4). Values are parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML: {err}") from err
    return key.split("."), value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(name_or_path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """defaults.yaml, then the experiment file (if any), then the dotted overrides; validated."""
    data = read_yaml(CONFIG_DIR / f"{DEFAULTS_NAME}.yaml")
    if name_or_path is not None:
        data = deep_merge(data, read_yaml(resolve_config_path(name_or_path)))
    return build_config(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """`section.key=value` items merged over a config dict, in order (validation is build_config's)."""
    for item in overrides:
        keys, value = parse_override(item)
        update: dict[str, Any] = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            update = {key: update}
        data = deep_merge(data, update)
    return data


def build_config(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, prefix="")
    flat = cfg.flat()
    for key, (ok, what) in _RANGE_CHECKS.items():
        if not ok(flat[key]):
            raise ConfigError(f"config key '{key}': {flat[key]!r} must be {what}")
    # masking.mode is checked where a strategy is built (clmae.masking.build_strategy): the config is plain data
    # and imports nothing of the method, so that the method's modules can import it.
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the merged config as YAML (atomically: a reader never sees half a file)."""
    from clmae.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_hash(cfg: Config, sections: typing.Iterable[str] | None = None) -> str:
    """Stable short hash of the whole config, or of some sections (to check a resume matches)."""
    data = cfg.to_dict()
    if sections is not None:
        data = {name: data[name] for name in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Typed construction with errors that name the key
# --------------------------------------------------------------------------------------------------


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}': expected a mapping, got {data!r} ({type(data).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if f"{prefix}{key}" in RENAMED_KEYS:
            new, values = RENAMED_KEYS[f"{prefix}{key}"]
            mapping = "; ".join(
                f"{key}: {json.dumps(old)} is {new.split('.')[1]}: {value}"
                for old, value in values.items()
            )
            raise ConfigError(f"config key '{prefix}{key}' is now '{new}' ({mapping})")
        if key not in fields:
            candidates = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(f"{prefix}{key}", candidates, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    missing = [f"{prefix}{name}" for name in fields if name not in data]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)}")
    values = {name: _coerce(data[name], hints[name], f"{prefix}{name}") for name in fields}
    return cls(**values)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    def fail() -> typing.NoReturn:
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        fail()
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept any numeric literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail()
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    raise TypeError(f"unsupported schema type for '{key}': {tp!r}")  # a bug in the schema, not user input

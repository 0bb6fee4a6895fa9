"""`clmae-eval`: linear probe, few-shot, k-NN and fine-tuning of a pre-trained encoder (SPEC section 8).

    clmae-eval linprobe runs/tiny_digits
    clmae-eval knn runs/tiny_digits/checkpoints/step_000000460 data.val_path=data/digits/val.beton
    clmae-eval fewshot encoder.safetensors --config tiny_digits
    torchrun --nproc_per_node 2 -m clmae.evaluate finetune runs/tiny_digits --epochs 2

CHECKPOINT is a run directory (its newest complete checkpoint), a step directory, or a weights file
(clmae-export's encoder, a full MAE, or facebookresearch/mae's checkpoint). The config is the checkpoint's
own (a weights file has none: defaults, or --config), then --config, then `section.key=value` overrides;
`data.train_path` and `data.val_path` name the .beton files (classes must agree between them).

Launched like pre-training (torchrun, srun, or a single process). The probes and k-NN run on rank 0 from
features that all ranks compute together once and cache; fine-tuning runs on every rank.

Results: a table on stdout, a JSON file (--out; default <run_dir>/eval/<step>/<protocol>.json, or
<file>_eval/<protocol>.json beside a weights file), and a new MLflow run in the pre-training run's experiment
and store, tagged `clmae.pretrain_run_id`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from clmae.cli import run_main
from clmae.errors import ClmaeError

PROTOCOLS = {
    "linprobe": "MAE linear-probe recipe on frozen CLS features (BN + Linear, LARS); top-1 / top-5",
    "fewshot": "linear probe on 1, 2, 4, 8, 16 labelled images per class, 3 seeds, mean +- std",
    "knn": "k-NN: reference (L2 on mean-pooled patches, k=5, majority + any of 5) and weighted cosine (k=20, T=0.07)",
    "finetune": "MAE fine-tuning recipe on DeepSpeed (layer decay, drop path, mixup/cutmix, RandAug, erasing)",
}


class DatasetMismatchError(ClmaeError, ValueError):
    """The training and validation files do not describe the same classes."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from clmae.eval import linprobe

    parser = argparse.ArgumentParser(
        prog="clmae-eval",
        description="Evaluate a pre-trained CL-MAE encoder.",
        epilog="example: clmae-eval linprobe runs/tiny_digits data.val_path=data/digits/val.beton",
    )
    sub = parser.add_subparsers(dest="protocol", required=True)
    for name, text in PROTOCOLS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", help="run directory, checkpoints/step_* directory, or weights file")
        p.add_argument("--config", default=None, help="config name or YAML merged over the checkpoint's config")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.val_path=val.beton")
        p.add_argument("--out", type=Path, default=None, help="results JSON (default: beside the checkpoint)")
        if name in ("linprobe", "fewshot"):
            p.add_argument("--epochs", type=int, default=linprobe.EPOCHS)
            p.add_argument("--warmup-epochs", type=float, default=linprobe.WARMUP_EPOCHS)
            p.add_argument(
                "--batch-size", type=int, default=linprobe.BATCH_SIZE, help="global batch; lr = base_lr * batch / 256"
            )
            p.add_argument("--base-lr", type=float, default=linprobe.BASE_LR)
        if name == "fewshot":
            p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        if name == "finetune":
            p.add_argument("--epochs", type=int, default=None, help="default: 100 (B), 50 (L, H), 2 (vit_tiny)")
            p.add_argument("--warmup-epochs", type=float, default=None)
            p.add_argument("--base-lr", type=float, default=None, help="lr = base_lr * global batch / 256")
            p.add_argument("--layer-decay", type=float, default=None, help="0.65 (B), 0.75 (L, H)")
            p.add_argument("--drop-path", type=float, default=None, help="0.1 (B), 0.2 (L), 0.3 (H)")
            p.add_argument("--mixup", type=float, default=None, help="mixup alpha (0.8)")
            p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (1.0)")
            p.add_argument("--smoothing", type=float, default=None, help="label smoothing (0.1)")
            p.add_argument("--randaug", default=None, help="timm RandAugment policy (rand-m9-mstd0.5-inc1); '' = off")
            p.add_argument("--reprob", type=float, default=None, help="random erasing probability (0.25)")
    return parser


def main() -> None:
    import warnings

    # DeepSpeed 0.19 calls a torch collective that torch 2.14 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_main(lambda: run(parse_args()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like `parse_args`, with `section.key=value` overrides accepted anywhere, also after options
    (argparse alone fills a `*` positional once, from the arguments right after CHECKPOINT)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    return args


# --------------------------------------------------------------------------------------------------
# Config and data checks (before any process group or forward pass, so mistakes fail in seconds)
# --------------------------------------------------------------------------------------------------


def resolve_config(source, config_name: str | None, overrides: list[str]):
    """defaults < the encoder's architecture < the checkpoint's config < --config < overrides; then the
    encoder must fit the model the result names."""
    from clmae.config import CONFIG_DIR, DEFAULTS_NAME, apply_overrides, build_config, deep_merge, read_yaml
    from clmae.config import resolve_config_path as resolve_path
    from clmae.models import timm_encoder_kwargs
    from clmae.weights import check_fits_timm

    data = read_yaml(CONFIG_DIR / f"{DEFAULTS_NAME}.yaml")
    data = deep_merge(data, {"model": {"name": source.model_name, "img_size": source.img_size}})
    if source.config is not None:
        data = deep_merge(data, source.config.to_dict())
    if config_name is not None:
        data = deep_merge(data, read_yaml(resolve_path(config_name)))
    cfg = build_config(apply_overrides(data, overrides))
    from clmae.models import VIT_SPECS

    img_size = cfg.model.img_size or VIT_SPECS[cfg.model.name].img_size
    check_fits_timm(
        source.state,
        timm_encoder_kwargs(cfg.model.name, img_size),
        where=f"{source.origin} (a {source.model_name} at {source.img_size} px) vs model.name={cfg.model.name}",
    )
    return cfg


def _class_list(beton: Path) -> dict | None:
    """The class index clmae-prep wrote beside a .beton (`<file>.classes.json` or `classes.json`), if any."""
    for candidate in (beton.with_name(beton.name + ".classes.json"), beton.parent / "classes.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def check_classes(train_path: str, val_path: str) -> int:
    """The number of classes, after checking that both files label the same classes: same class index
    file (when present), every label in range, and no validation class absent from training."""
    import numpy as np

    from data_prep import DataPrepError
    from data_prep.verify import BetonFile

    labels = {}
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        try:
            labels[key] = BetonFile(path).labels
        except DataPrepError as err:
            raise DatasetMismatchError(f"{key}: {err}") from None
    train, val = labels["data.train_path"], labels["data.val_path"]
    train_index, val_index = _class_list(Path(train_path)), _class_list(Path(val_path))
    if train_index is not None and val_index is not None and train_index != val_index:
        raise DatasetMismatchError(
            f"{train_path} and {val_path} were written with different class lists "
            f"({len(train_index)} vs {len(val_index)} classes); convert both from the same class folders"
        )
    num_classes = len(train_index) if train_index is not None else int(train.max()) + 1
    for path, values in ((train_path, train), (val_path, val)):
        if values.min() < 0 or values.max() >= num_classes:
            raise DatasetMismatchError(
                f"{path}: labels {int(values.min())}..{int(values.max())} are outside the {num_classes} classes "
                f"of the training data"
            )
    unseen = sorted(set(np.unique(val).tolist()) - set(np.unique(train).tolist()))
    if unseen:
        shown = ", ".join(str(u) for u in unseen[:10])
        raise DatasetMismatchError(
            f"{val_path} has {len(unseen)} class(es) that {train_path} never shows (labels {shown}): "
            "the two files do not describe the same classes"
        )
    return num_classes


def default_output_dir(source) -> Path:
    if source.step_dir is not None:
        return source.step_dir.parent.parent / "eval" / source.step_dir.name
    return source.file.with_name(f"{source.file.stem}_eval")


def tracking_dir(source) -> Path:
    """Where the default SQLite store is: the pre-training run's directory, or beside a weights file."""
    return source.step_dir.parent.parent if source.step_dir is not None else source.file.parent


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from clmae.weights import load_encoder

    source = load_encoder(args.checkpoint)
    cfg = resolve_config(source, args.config, args.overrides)
    num_classes = check_classes(cfg.data.train_path, cfg.data.val_path)
    if args.protocol == "fewshot" and Path(cfg.data.train_path).resolve() == Path(cfg.data.val_path).resolve():
        raise DatasetMismatchError(
            f"few-shot draws its labelled images from data.train_path and evaluates on data.val_path; both are "
            f"{cfg.data.train_path}, so evaluation images could be among the labelled ones"
        )
    out_dir = default_output_dir(source)
    out_file = args.out or out_dir / f"{args.protocol}.json"

    import torch

    from clmae import dist
    from clmae.tracking import Tracker

    env = dist.init(cfg.dist.backend, cfg.dist.timeout_minutes)
    tracker = None
    try:
        run_name = f"{cfg.run.name}-{args.protocol}"
        tracker = Tracker(
            dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name)), tracking_dir(source), env.is_main
        )
        settings = protocol_settings(args, source)
        tracker.set_tags(
            {
                "clmae.pretrain_run_id": source.pretrain_run_id or "",
                "clmae.protocol": args.protocol,
                "clmae.checkpoint": str(source.origin.resolve()),
            }
        )
        if tracker.active:
            import mlflow

            mlflow.log_params({f"eval.{k}": str(v) for k, v in settings.items()})
        dist.log(
            f"{args.protocol}: {source.model_name} from {source.origin}, {num_classes} classes, "
            f"train {cfg.data.train_path}, val {cfg.data.val_path}, {env.world_size} rank(s)"
        )

        if args.protocol == "finetune":
            from clmae.eval.finetune import FinetuneSettings, finetune

            results = finetune(source, cfg, env, num_classes, FinetuneSettings(**settings), tracker)
        else:
            from clmae.eval.features import cached_features

            encoder = source.build_timm().to(env.device)
            train = cached_features(encoder, source.identity(), cfg.data.train_path, cfg, env, out_dir / "features")
            val = cached_features(encoder, source.identity(), cfg.data.val_path, cfg, env, out_dir / "features")
            results = (
                feature_protocol(args.protocol, train, val, num_classes, settings, torch.device(env.device))
                if env.is_main
                else {}
            )

        if env.is_main:
            report = {
                "protocol": args.protocol,
                "checkpoint": str(source.origin.resolve()),
                "model": source.model_name,
                "global_step": source.global_step,
                "pretrain_run_id": source.pretrain_run_id,
                "mlflow_run_id": tracker.run_id,
                "train_path": cfg.data.train_path,
                "val_path": cfg.data.val_path,
                "num_classes": num_classes,
                "settings": settings,
                "results": results,
            }
            write_json(out_file, report)
            print(format_table(args.protocol, results))
            print(f"results: {out_file}")
            if tracker.active:
                import mlflow

                mlflow.log_metrics(results, synchronous=True)
                tracker.log_artifact(out_file)
        tracker.finish()
        return 0
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        dist.shutdown()


def protocol_settings(args: argparse.Namespace, source) -> dict[str, Any]:
    """The protocol's hyper-parameters as used (recorded in the JSON and as MLflow params)."""
    if args.protocol in ("linprobe", "fewshot"):
        settings = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "base_lr")}
        if args.protocol == "fewshot":
            settings.update(shots=list(args.shots), seeds=list(args.seeds))
        return settings
    if args.protocol == "finetune":
        from clmae.eval.finetune import FinetuneSettings

        settings = dataclasses.asdict(FinetuneSettings.for_model(source.model_name))
        given = {k: v for k, v in vars(args).items() if k in settings and v is not None}
        return settings | given
    from clmae.eval import knn

    return {"l2_k": knn.REFERENCE_K, "cosine_k": knn.COSINE_K, "cosine_temperature": knn.COSINE_TEMPERATURE}


def feature_protocol(protocol: str, train, val, num_classes: int, settings: dict, device) -> dict[str, float]:
    """linprobe, fewshot or knn on cached features (rank 0)."""
    from clmae.eval import fewshot, knn, linprobe

    train, val = train.to(device), val.to(device)
    if protocol == "knn":
        return knn.evaluate_knn(train, val, num_classes)
    probe_kwargs = {k: settings[k] for k in ("epochs", "warmup_epochs", "batch_size", "base_lr")}
    if protocol == "linprobe":
        probe = linprobe.train_linear_probe(train.cls, train.labels, num_classes, show_progress=True, **probe_kwargs)
        return {f"linprobe/{k}": v for k, v in linprobe.accuracy(probe, val.cls, val.labels).items()}
    return fewshot.run_fewshot(
        train.cls,
        train.labels,
        val.cls,
        val.labels,
        num_classes,
        tuple(settings["shots"]),
        tuple(settings["seeds"]),
        **probe_kwargs,
    )


def format_table(protocol: str, results: dict[str, float]) -> str:
    """Results as aligned `metric  value` lines; few-shot as one `shots  mean +- std` line per shot count."""
    if protocol == "fewshot":
        shots = sorted({int(re.match(r"fewshot_(\d+)shot/", key).group(1)) for key in results})
        rows = [("shots", "top-1 % (mean +- std)")]
        rows += [
            (str(n), f"{results[f'fewshot_{n}shot/top1_mean']:.2f} +- {results[f'fewshot_{n}shot/top1_std']:.2f}")
            for n in shots
        ]
    else:
        rows = [("metric", "%")] + [(name, f"{value:.2f}") for name, value in results.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

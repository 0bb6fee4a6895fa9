"""`clmae-eval`: linear probe, few-shot, k-NN and fine-tuning of a pre-trained encoder (SPEC section 8).

    clmae-eval linprobe runs/tiny_digits
    clmae-eval knn runs/tiny_digits/checkpoints/step_000000460 data.val_path=data/digits/val.beton
    clmae-eval knn_reference runs/tiny_digits
    clmae-eval linprobe runs/tiny_digits --lr-rule reference --augment
    clmae-eval fewshot encoder.safetensors --config tiny_digits
    clmae-eval knn runs/tiny_digits --data data/downstream/svhn     # a folder with train.beton + val.beton
    torchrun --nproc_per_node 2 -m clmae.evaluate finetune runs/tiny_digits --epochs 2

CHECKPOINT is a run directory (its newest complete checkpoint), a step directory, or a weights file
(clmae-export's encoder, a full MAE, or facebookresearch/mae's checkpoint). The config is the checkpoint's
own (a weights file has none: defaults, or --config), then --config, then `section.key=value` overrides;
`data.train_path` and `data.val_path` name the .beton files (classes must agree between them).

Launched like pre-training (torchrun, srun, or a single process). The probes and k-NN run on rank 0 from
features that all ranks compute together once and cache; fine-tuning runs on every rank.

The protocols are modules of clmae/eval/, found through clmae.eval.protocols() (the built-in list, plus
CLMAE_EVAL_PLUGINS=module:attr,...): each declares its options, settings and run function
(clmae/eval/protocol.py); this module does what is common to all of them.

Results: a table on stdout, a JSON file naming the protocol and its settings (--out; default
<run_dir>/eval/<step>/<protocol>.json, or <file>_eval/<protocol>.json beside a weights file), and a new
MLflow run in the pre-training run's experiment and store, tagged `clmae.pretrain_run_id`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from clmae.cli import run_main
from clmae.eval.protocol import DatasetMismatchError, metric_table
from clmae.files import write_atomic

# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from clmae.eval import protocols

    parser = argparse.ArgumentParser(
        prog="clmae-eval",
        description="Evaluate a pre-trained CL-MAE encoder.",
        epilog="example: clmae-eval linprobe runs/tiny_digits data.val_path=data/digits/val.beton",
    )
    sub = parser.add_subparsers(dest="protocol", required=True)
    for name, protocol in protocols().items():
        p = sub.add_parser(name, help=protocol.help, description=protocol.help)
        p.add_argument("checkpoint", help="run directory, checkpoints/step_* directory, or weights file")
        p.add_argument("--config", default=None, help="config name or YAML merged over the checkpoint's config")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.val_path=val.beton")
        p.add_argument("--out", type=Path, default=None, help="results JSON (default: beside the checkpoint)")
        p.add_argument(
            "--data",
            type=Path,
            default=None,
            metavar="DIR",
            help="DIR/train.beton and DIR/val.beton as data.train_path "
            "and data.val_path (a clmae-prep output folder; its dataset.json's eval transform applies)",
        )
        protocol.add_arguments(p)
    return parser


def main() -> None:
    import warnings

    # DeepSpeed 0.19 calls a torch collective that torch 2.14 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_main(lambda: run(parse_args()), skip_teardown=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like `parse_args`, with `section.key=value` overrides accepted anywhere, also after options
    (argparse alone fills a `*` positional once, from the arguments right after CHECKPOINT)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    data = []
    if args.data is not None:  # before the overrides, so that an explicit data.*_path still wins
        missing = [name for name in ("train.beton", "val.beton") if not (args.data / name).is_file()]
        if missing:
            parser.error(f"--data {args.data}: no {' or '.join(missing)} in it (write them with clmae-prep)")
        data = [f"data.train_path={args.data / 'train.beton'}", f"data.val_path={args.data / 'val.beton'}"]
    args.overrides = [*data, *args.overrides, *rest]
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
    check_fits_timm(
        source.state,
        timm_encoder_kwargs(cfg.model.name, cfg.model.img_size),
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
    from clmae.checkpoint import run_dir_of

    if source.step_dir is not None:
        return run_dir_of(source.step_dir) / "eval" / source.step_dir.name
    return source.file.with_name(f"{source.file.stem}_eval")


def tracking_dir(source) -> Path:
    """Where the default SQLite store is: the pre-training run's directory, or beside a weights file."""
    from clmae.checkpoint import run_dir_of

    return run_dir_of(source.step_dir) if source.step_dir is not None else source.file.parent


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from clmae.eval import protocols
    from clmae.weights import load_encoder

    protocol = protocols()[args.protocol]
    source = load_encoder(args.checkpoint)
    cfg = resolve_config(source, args.config, args.overrides)
    from clmae.preflight import check_data_file

    for key in ("data.train_path", "data.val_path"):
        check_data_file(getattr(cfg.data, key.split(".")[1]), key)
    num_classes = check_classes(cfg.data.train_path, cfg.data.val_path)
    if protocol.check is not None:
        protocol.check(args, cfg)
    settings = protocol.settings(args, source)
    out_dir = default_output_dir(source)
    out_file = args.out or out_dir / f"{protocol.name}.json"

    from clmae import dist
    from clmae.eval.protocol import EvalContext
    from clmae.tracking import Tracker

    env = dist.init(cfg.dist.backend, cfg.dist.timeout_minutes)
    tracker = None
    try:
        run_name = f"{cfg.run.name}-{protocol.name}"
        tracker = Tracker(
            dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name)), tracking_dir(source), env.is_main
        )
        tracker.set_tags(
            {
                "clmae.pretrain_run_id": source.pretrain_run_id or "",
                "clmae.protocol": protocol.name,
                "clmae.checkpoint": str(source.origin.resolve()),
            }
        )
        tracker.log_params({f"eval.{k}": v for k, v in settings.items()})
        dist.log(
            f"{protocol.name}: {source.model_name} from {source.origin}, {num_classes} classes, "
            f"train {cfg.data.train_path}, val {cfg.data.val_path}, {env.world_size} rank(s)"
        )
        ctx = EvalContext(source, cfg, env, num_classes, settings, tracker, out_dir)
        results = protocol.run(ctx)
        if env.is_main:
            report = {
                "protocol": protocol.name,
                "description": protocol.help,
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
            print(format_table(protocol.name, results))
            print(f"results: {out_file}")
            tracker.log_metrics(results, step=None)
            tracker.log_artifact(out_file)
        tracker.finish()
        return 0
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        dist.shutdown()


def format_table(protocol: str, results: dict[str, float]) -> str:
    """The protocol's table of its results (default: aligned `metric  value` lines)."""
    from clmae.eval import protocols

    formatter = protocols()[protocol].format_table or metric_table
    return formatter(results)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()

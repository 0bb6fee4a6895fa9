"""Random masking (plain MAE) against the CL-MAE curriculum, and against no pre-training, on digits or Fashion-MNIST.

A small-scale version of the paper's comparison. The same tiny model (config `tiny_digits`: vit_tiny at 32 px,
DeepSpeed ZeRO-2 on 2 CPU ranks) is pre-trained on the bundled digits set twice, from the same seed:

- MAE: `masking.mode=random`, plain MAE with uniformly random masks;
- CL-MAE: `masking.mode=curriculum` (the default), masks from the learned curriculum masking module,
  partner to adversary over the epochs.

A third row is the same encoder before any training: the weights both runs start from (`run.seed`), exported
as a weights file. Each encoder is evaluated frozen with `clmae-eval`: few-shot linear probes (1, 2, 4, 8 and
16 labelled images per class, 3 seeds, mean +- std) and k-NN. The results go into one table, rows by method.

Every stage is an existing command, as `make demo` runs it: `python -m data_prep digits` if the .beton files
are missing, `torchrun --standalone --nproc_per_node 2 -m clmae.train --config tiny_digits`, and
`clmae-eval fewshot|knn`. A rerun skips what is done: a finished pre-training is not launched again (an
interrupted one resumes, `checkpoint.resume=auto`), and an evaluation JSON of the same checkpoint is reused.
Extra `section.key=value` arguments go to both pre-trainings. Results: a markdown table on stdout, with the
machine and the wall time of each stage, and `results.json` + `results.md` in `--out-dir`.

    python benchmarks/compare_masking.py                    # or: make compare-masking
    python benchmarks/compare_masking.py --epochs 2 --out-dir runs/compare_masking_2ep
    python benchmarks/compare_masking.py --dataset fashion  # or: make compare-masking DATASET=fashion

`--dataset fashion` runs the same comparison on Fashion-MNIST (60,000 training images; config `tiny_fashion`,
data from `clmae-prep fashion-mnist`, 2 epochs unless --epochs says otherwise): about 65 minutes on 2 idle
cores (CL-MAE ~18 min per epoch, MAE ~6, each evaluation ~4 min; estimated from measured per-image costs).

On 2 CPU cores the default run takes 15 to 20 minutes; a rerun of a finished benchmark, a few seconds. Measured
on an otherwise idle 2-core machine: the CL-MAE pre-training takes 9.5 minutes (about 55 img/s: on this tiny
model a CL-MAE iteration has 5.4x the FLOPs of an MAE iteration), the MAE pre-training about 3 minutes, and each
evaluation 15 to 35 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from clmae.demo import console_script, run


@dataclass(frozen=True)
class Dataset:
    config: str  # the shipped config
    data_dir: Path  # default --data-dir
    prep: str  # the clmae-prep command that writes train.beton + val.beton into data_dir
    label: str  # for the table's title and the stage names
    epochs: int  # default --epochs
    out_dir: Path  # default --out-dir


DATASETS = {
    "digits": Dataset("tiny_digits", Path("data/digits"), "digits", "digits", 20, Path("runs/compare_masking")),
    # 468 steps an epoch (63x digits'): 2 epochs already hold 6x the images the 20 digits epochs do.
    "fashion": Dataset(
        "tiny_fashion", Path("data/fashion"), "fashion-mnist", "Fashion-MNIST", 2, Path("runs/compare_masking_fashion")
    ),
}
PROTOCOLS = ("fewshot", "knn")
KNN_LABELS = {
    "knn_l2_k5/acc1": "k-NN L2 k=5",
    "knn_l2_k5/any_of_5": "k-NN L2 k=5, any of 5",
    "knn_cosine_k20/top1": "k-NN cosine k=20",
    "knn_cosine_k20/top5": "k-NN cosine k=20, top-5",
}


@dataclass(frozen=True)
class Method:
    name: str  # subdirectory of --out-dir
    label: str  # row of the table
    overrides: tuple[str, ...]  # pre-training overrides; () = no pre-training


METHODS = (
    Method("random_init", "no pre-training (random init)", ()),
    Method("mae_random", "MAE (random masking)", ("masking.mode=random",)),
    Method("clmae_curriculum", "CL-MAE (curriculum)", ("masking.mode=curriculum",)),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="a subdirectory per method (default: runs/compare_masking[_fashion])"
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits", help="what to pre-train and probe on")
    parser.add_argument("--data-dir", type=Path, default=None, help="train.beton + val.beton (default: data/<dataset>)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="pre-training epochs (train.epochs); default 20 (digits), 2 (fashion)"
    )
    parser.add_argument("--seed", type=int, default=0, help="run.seed: initial weights, masks, data order")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="more pre-training overrides")
    args = parser.parse_args()
    args.data = DATASETS[args.dataset]
    args.data_dir = args.data_dir or args.data.data_dir
    args.epochs = args.epochs or args.data.epochs
    args.out_dir = args.out_dir or args.data.out_dir
    if any(item.startswith("masking.mode=") for item in args.overrides):
        parser.error("masking.mode is what this benchmark varies; leave it out of the overrides")
    from clmae.config import load_config
    from clmae.errors import ClmaeError

    try:  # a wrong key or value fails here, in seconds, not after the first pre-training
        for method in METHODS:
            load_config(args.data.config, pretrain_overrides(args, method))
    except ClmaeError as err:
        parser.error(str(err))
    return args


def data_overrides(data_dir: Path) -> list[str]:
    return [f"data.train_path={data_dir / 'train.beton'}", f"data.val_path={data_dir / 'val.beton'}"]


def pretrain_overrides(args: argparse.Namespace, method: Method) -> list[str]:
    """The method's overrides come last, so that they win."""
    return [
        f"run.output_dir={args.out_dir}",
        f"run.name={method.name}",
        f"run.seed={args.seed}",
        f"train.epochs={args.epochs}",
        "tracking.system_metrics=false",
        *data_overrides(args.data_dir),
        *args.overrides,
        *method.overrides,
    ]


class Stages:
    """The stages run so far with their wall times; a failing stage stops the benchmark naming itself.

    A stage skipped as done keeps the wall time it took when it ran (from the last results.json), so that the
    results of a rerun still say what each stage cost."""

    def __init__(self, results_file: Path) -> None:
        self.done: list[dict] = []
        previous = json.loads(results_file.read_text())["stages"] if results_file.is_file() else []
        self.earlier = {stage["stage"]: stage["seconds"] for stage in previous}

    def command(self, name: str, argv: list[str], **env: str) -> None:
        started = time.perf_counter()
        run(name, argv, program="compare_masking", **env)
        self.record(name, time.perf_counter() - started)

    def record(self, name: str, seconds: float) -> None:
        self.done.append({"stage": name, "seconds": round(seconds, 1), "reused": False})

    def reuse(self, name: str) -> None:
        self.done.append({"stage": name, "seconds": self.earlier.get(name), "reused": True})

    def table(self) -> list[str]:
        def cell(stage: dict) -> str:
            if stage["seconds"] is None:  # reused, with no time on record
                return "reused"
            took = f"{stage['seconds']:.0f} s"
            return f"reused (took {took})" if stage["reused"] else took

        return ["| stage | wall time |", "|---|---|", *(f"| {s['stage']} | {cell(s)} |" for s in self.done)]

    def total(self) -> float:
        """Seconds of all the stages' work, this run's and the reused stages' earlier runs'."""
        return sum(stage["seconds"] or 0.0 for stage in self.done)


def prepare_data(args: argparse.Namespace, stages: Stages) -> None:
    name, data_dir = f"convert the {args.data.label}", args.data_dir
    if (data_dir / "train.beton").is_file() and (data_dir / "val.beton").is_file():
        stages.reuse(name)
        return
    stages.command(name, [sys.executable, "-m", "data_prep", args.data.prep, str(data_dir), "--overwrite"])


def pretrain(args: argparse.Namespace, method: Method, stages: Stages) -> Path:
    """The run's newest checkpoint after pre-training it (or finding it already finished)."""
    from clmae.checkpoint import find_latest, read_client_state

    run_dir = args.out_dir / method.name
    name = f"pre-train {method.label}"
    latest = find_latest(run_dir)
    if latest is not None:
        state = read_client_state(latest)
        if state.epoch >= args.epochs and state.config["train"]["epochs"] == args.epochs:
            print(f"\n=== {name}: finished earlier ({latest}, {state.global_step} steps)", flush=True)
            stages.reuse(name)
            return latest
    stages.command(
        name,
        [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "clmae.train"]
        + ["--config", args.data.config, *pretrain_overrides(args, method)],
        OMP_NUM_THREADS="1",
    )
    latest = find_latest(run_dir)
    if latest is None:
        sys.exit(f"compare_masking: '{name}' left no complete checkpoint in {run_dir}")
    return latest


def random_encoder(args: argparse.Namespace, method: Method, stages: Stages) -> Path:
    """The encoder before training, as the pre-training runs initialise it (seeded), as a weights file."""
    path = args.out_dir / method.name / f"encoder_seed{args.seed}.safetensors"
    name = "initialise a random encoder"
    if path.is_file():
        stages.reuse(name)
        return path
    started = time.perf_counter()
    try:
        import torch
        from safetensors.torch import save_file

        from clmae.config import load_config
        from clmae.models import build_mae

        model = load_config(args.data.config, pretrain_overrides(args, method)).model
        torch.manual_seed(args.seed)  # as clmae.train, just before it builds the models
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(build_mae(model.name, model.img_size, model.mask_ratio).encoder_state_dict(), path)
    except Exception as err:
        sys.exit(f"compare_masking: '{name}' failed: {err}")
    print(f"\n=== {name}: {path}", flush=True)
    stages.record(name, time.perf_counter() - started)
    return path


def evaluate(args: argparse.Namespace, method: Method, checkpoint: Path, stages: Stages) -> dict[str, dict]:
    """{protocol: clmae-eval's JSON report}; a report of the same checkpoint is reused."""
    results = {}
    for protocol in PROTOCOLS:
        out = args.out_dir / method.name / f"{protocol}.json"
        name = f"evaluate {method.label}: {protocol}"
        if out.is_file():
            report = json.loads(out.read_text())
            if Path(report["checkpoint"]) == checkpoint.resolve():
                stages.reuse(name)
                results[protocol] = report
                continue
        extra = [] if method.overrides else ["--config", args.data.config, *data_overrides(args.data_dir)]
        stages.command(name, [console_script("clmae-eval"), protocol, str(checkpoint), *extra, "--out", str(out)])
        results[protocol] = json.loads(out.read_text())
    return results


def markdown_table(rows: dict[str, dict[str, dict]]) -> str:
    """One row per method: few-shot top-1 (mean +- std over seeds) per shot count, then the k-NN metrics."""
    first = next(iter(rows.values()))
    shots = first["fewshot"]["settings"]["shots"]
    knn_keys = list(first["knn"]["results"])
    header = ["method", *(f"{n}-shot" for n in shots), *(KNN_LABELS.get(key, key) for key in knn_keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, reports in rows.items():
        fewshot, knn = reports["fewshot"]["results"], reports["knn"]["results"]
        cells = [
            f"{fewshot[f'fewshot_{n}shot/top1_mean']:.1f} +- {fewshot[f'fewshot_{n}shot/top1_std']:.1f}" for n in shots
        ]
        cells += [f"{knn[key]:.1f}" for key in knn_keys]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def machine() -> dict[str, str | int | None]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": version("torch"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    stages = Stages(args.out_dir / "results.json")
    prepare_data(args, stages)
    rows: dict[str, dict[str, dict]] = {}
    checkpoints: dict[str, str] = {}
    for method in METHODS:  # the random encoder first: a broken evaluation shows before any pre-training
        if method.overrides:
            checkpoint = pretrain(args, method, stages)
        else:
            checkpoint = random_encoder(args, method, stages)
        checkpoints[method.label] = str(checkpoint)
        rows[method.label] = evaluate(args, method, checkpoint, stages)
    total = time.perf_counter() - started

    host = machine()
    table = markdown_table(rows)
    seeds = len(rows[METHODS[0].label]["fewshot"]["settings"]["seeds"])
    title = (
        f"{args.data.label} validation, top-1 % (few-shot: mean +- std over {seeds} seeds); "
        f"{args.data.config}, {args.epochs} epochs of pre-training, seed {args.seed}"
        + (f", overrides: {' '.join(args.overrides)}" if args.overrides else "")
    )
    where = (
        f"machine: {host['cpu_count']} CPUs ({host['cpus_usable']} usable), torch {host['torch']}, "
        f"deepspeed {host['deepspeed']}, Python {host['python']}, {host['platform']}"
    )
    work = stages.total()
    summary = f"total: {total / 60:.1f} min" + (
        f" (with the reused stages' earlier times: {work / 60:.1f} min)" if work > total + 1 else ""
    )
    text = "\n".join([title, "", table, "", where, "", *stages.table(), "", summary])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text + "\n")
    report = {
        "dataset": args.dataset,
        "config": args.data.config,
        "epochs": args.epochs,
        "seed": args.seed,
        "overrides": args.overrides,
        "data_dir": str(args.data_dir),
        "machine": host,
        "checkpoints": checkpoints,
        "results": {label: {p: reports[p]["results"] for p in PROTOCOLS} for label, reports in rows.items()},
        "stages": stages.done,
        "total_seconds": round(total, 1),
        "total_seconds_with_reused": round(work, 1),
        "table": table,
    }
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78)
    print(f"written: {args.out_dir / 'results.md'}, {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()

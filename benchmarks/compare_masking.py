"""Random masking (plain MAE) against the CL-MAE curriculum, and against no pre-training, on digits or Fashion-MNIST.

A small-scale version of the paper's comparison, at equal epochs and at equal compute. The same tiny model
(config `tiny_digits`: vit_tiny at 32 px, DeepSpeed ZeRO-2 on 2 CPU ranks) is pre-trained on the bundled
digits set from each of the pre-training seeds (`--seeds`, default 0 and 1), in four arms:

- no pre-training: the encoder the pre-training runs start from (`run.seed`), exported as a weights file;
- MAE, equal epochs: `masking.mode=random`, plain MAE with uniformly random masks, `--epochs` epochs;
- MAE, equal FLOPs: the same, for the epochs whose counted training FLOPs match the CL-MAE run's
  (`clmae.masking.iteration_flops`: the CL-MAE iteration, MAE step + CMM step, over the MAE iteration, times
  `--epochs`, rounded; the same batch, so the same iterations per epoch);
- CL-MAE: `masking.mode=curriculum` (the default), masks from the learned curriculum masking module,
  partner to adversary over `--epochs` epochs.

`--cheaper K:F ...` adds, for each setting, two arms: CL-MAE with the CMM's step on one iteration in K
(`masking.cmm_every`) on the fraction F of each micro-batch (`masking.cmm_batch_fraction`), for `--epochs`
epochs, and MAE for the epochs whose counted FLOPs match that arm's (`iteration_flops` counts both options).
`--only-cheaper` leaves out the paper's CL-MAE and its equal-FLOPs MAE (a sweep of settings). Every arm's
counted FLOPs per image, epochs and pre-training wall time are in a second table.

Each encoder is evaluated frozen with `clmae-eval`: few-shot linear probes (1, 2, 4, 8 and 16 labelled
images per class, 3 probe seeds, mean +- std) and k-NN. The table has one row per arm: the mean +- std over
the pre-training seeds (the few-shot cell of one seed is the mean over its probe seeds); a second table
has every seed's row.

Every stage is an existing command, as `make demo` runs it: `python -m data_prep digits` if the .beton files
are missing, `torchrun --standalone --nproc_per_node 2 -m clmae.train --config tiny_digits`, and
`clmae-eval fewshot|knn`. A rerun skips what is done: a finished pre-training is not launched again (an
interrupted one resumes, `checkpoint.resume=auto`), and an evaluation JSON of the same checkpoint is reused.
Extra `section.key=value` arguments go to every pre-training. Results: markdown tables on stdout, with the
machine and the wall time of each stage, and `results.json` + `results.md` in `--out-dir` (rewritten after
each arm, marked partial until all are done).

    python benchmarks/compare_masking.py                    # or: make compare-masking
    python benchmarks/compare_masking.py --epochs 2 --seeds 0 --out-dir runs/compare_masking_2ep
    python benchmarks/compare_masking.py --dataset fashion  # or: make compare-masking DATASET=fashion
    python benchmarks/compare_masking.py curriculum.granularity=step --cheaper 4:1 2:0.5   # overrides before --cheaper

`--dataset fashion` runs the same comparison on Fashion-MNIST (60,000 training images; config `tiny_fashion`,
data from `clmae-prep fashion-mnist`, 2 epochs unless --epochs says otherwise). Measured on 2 idle cores with
`--seeds 0`: 71 minutes (CL-MAE 12 min per epoch, MAE 2.6-2.9, each evaluation about 3 min); the default
two seeds take about twice that.

Measured on an otherwise idle 2-core machine, per seed at 20 epochs: the CL-MAE pre-training takes 5.3 minutes
(about 90 img/s: on this tiny model a CL-MAE iteration has 5.4x the FLOPs of an MAE iteration), the MAE
pre-training 80 s at equal epochs and 6 minutes at equal FLOPs, and each evaluation 8 to 20 seconds:
29 minutes for the default two seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
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
    name: str  # subdirectory of --out-dir (with the seed appended)
    label: str  # row of the table
    overrides: tuple[str, ...]  # pre-training overrides; () = no pre-training
    # Train for the counted FLOPs of `--epochs` epochs of the arm with these overrides instead of `--epochs`.
    equal_flops_to: tuple[str, ...] | None = None


CURRICULUM = ("masking.mode=curriculum",)
METHODS = (
    Method("random_init", "no pre-training (random init)", ()),
    Method("mae_random", "MAE, equal epochs", ("masking.mode=random",)),
    Method("mae_equal_flops", "MAE, equal FLOPs", ("masking.mode=random",), equal_flops_to=CURRICULUM),
    Method("clmae_curriculum", "CL-MAE (curriculum)", CURRICULUM),
)
PAPER_ARMS = ("mae_equal_flops", "clmae_curriculum")  # what --only-cheaper leaves out


def parse_cheaper(text: str) -> tuple[int, float]:
    """'K:F' -> (masking.cmm_every, masking.cmm_batch_fraction)."""
    if "=" in text:  # --cheaper takes every following K:F, so an override after it lands here
        raise argparse.ArgumentTypeError(
            f"expected K:F, got {text!r}: put section.key=value overrides before --cheaper"
        )
    every, sep, fraction = text.partition(":")
    try:
        setting = (int(every), float(fraction)) if sep else (int(every), 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:F (e.g. 4:1 or 2:0.5), got {text!r}") from None
    if setting[0] < 1 or not 0 < setting[1] <= 1:
        raise argparse.ArgumentTypeError(f"K >= 1 and 0 < F <= 1, got {text!r}")
    return setting


def cheaper_methods(every: int, fraction: float) -> tuple[Method, Method]:
    """The cheaper CL-MAE arm and the MAE arm of its counted FLOPs."""
    tag = f"every{every}_frac{fraction:g}"
    setting = (*CURRICULUM, f"masking.cmm_every={every}", f"masking.cmm_batch_fraction={fraction:g}")
    what = "CMM step" + (f" 1 in {every}" if every > 1 else "")
    what += f" on {fraction:g} of the batch" if fraction < 1 else ""
    return (
        Method(f"mae_flops_{tag}", f"MAE, equal FLOPs to CL-MAE ({what})", ("masking.mode=random",), setting),
        Method(f"clmae_{tag}", f"CL-MAE ({what})", setting),
    )


def methods(args: argparse.Namespace) -> list[Method]:
    chosen = [m for m in METHODS if not (args.only_cheaper and m.name in PAPER_ARMS)]
    for every, fraction in args.cheaper:
        chosen += cheaper_methods(every, fraction)
    return chosen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="a subdirectory per method (default: runs/compare_masking[_fashion])"
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits", help="what to pre-train and probe on")
    parser.add_argument("--data-dir", type=Path, default=None, help="train.beton + val.beton (default: data/<dataset>)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="pre-training epochs of CL-MAE and equal-epoch MAE; default 20 (digits), 2 (fashion)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="pre-training seeds (run.seed: weights, masks, order)"
    )
    parser.add_argument(
        "--cheaper", type=parse_cheaper, nargs="+", default=[], metavar="K:F",
        help="cheaper curricula: the CMM's step on 1 iteration in K on a fraction F of the batch, each with an MAE arm "
        "of equal FLOPs",
    )  # fmt: skip
    parser.add_argument(
        "--only-cheaper", action="store_true", help="without the paper's CL-MAE and its equal-FLOPs MAE"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="more pre-training overrides")
    args = parser.parse_args()
    args.data = DATASETS[args.dataset]
    args.data_dir = args.data_dir or args.data.data_dir
    args.epochs = args.epochs or args.data.epochs
    args.out_dir = args.out_dir or args.data.out_dir
    varied = ("masking.mode=", "masking.cmm_every=", "masking.cmm_batch_fraction=", "train.epochs=", "run.seed=")
    if any(item.startswith(varied) for item in args.overrides):
        parser.error(f"{', '.join(v.rstrip('=') for v in varied)} are what this benchmark varies; leave them out")
    if args.only_cheaper and not args.cheaper:
        parser.error("--only-cheaper needs --cheaper K:F")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    from clmae.config import load_config
    from clmae.errors import ClmaeError

    try:  # a wrong key or value fails here, in seconds, not after the first pre-training
        for method in methods(args):
            load_config(args.data.config, pretrain_overrides(args, method, args.seeds[0], args.epochs))
    except ClmaeError as err:
        parser.error(str(err))
    return args


def arm_flops(args: argparse.Namespace, arms: list[Method]) -> tuple[dict[str, int], dict[str, float]]:
    """Each arm's epochs (`--epochs`; an equal-FLOPs arm: those whose counted training FLOPs match `--epochs`
    epochs of its target, rounded) and counted training FLOPs per image and iteration; 0 for no pre-training.
    flops["paper run"]: the training FLOPs per image of the paper's CL-MAE over `--epochs` epochs."""
    from clmae.config import load_config
    from clmae.masking import iteration_flops

    @functools.cache  # each config is counted once, however many arms share it
    def per_image(overrides: tuple[str, ...]) -> float:
        return sum(iteration_flops(load_config(args.data.config, [*args.overrides, *overrides])).values())

    epochs, flops = {}, {}
    for arm in arms:
        flops[arm.label] = per_image(arm.overrides) if arm.overrides else 0.0
        epochs[arm.label] = args.epochs if arm.overrides else 0
        if arm.equal_flops_to is not None:
            epochs[arm.label] = max(1, round(args.epochs * per_image(arm.equal_flops_to) / flops[arm.label]))
    flops["paper run"] = args.epochs * per_image(CURRICULUM)
    return epochs, flops


def data_overrides(data_dir: Path) -> list[str]:
    return [f"data.train_path={data_dir / 'train.beton'}", f"data.val_path={data_dir / 'val.beton'}"]


def run_name(method: Method, seed: int) -> str:
    return f"{method.name}_seed{seed}"


def pretrain_overrides(args: argparse.Namespace, method: Method, seed: int, epochs: int) -> list[str]:
    """The method's overrides come last, so that they win."""
    return [
        f"run.output_dir={args.out_dir}",
        f"run.name={run_name(method, seed)}",
        f"run.seed={seed}",
        f"train.epochs={epochs}",
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


def pretrain(args: argparse.Namespace, method: Method, seed: int, epochs: int, stages: Stages) -> Path:
    """The run's newest checkpoint after pre-training it (or finding it already finished)."""
    from clmae.checkpoint import find_latest, read_client_state

    run_dir = args.out_dir / run_name(method, seed)
    name = f"pre-train {method.label}, {epochs} epochs, seed {seed}"
    latest = find_latest(run_dir)
    if latest is not None:
        state = read_client_state(latest)
        if state.epoch >= epochs and state.config["train"]["epochs"] == epochs:
            print(f"\n=== {name}: finished earlier ({latest}, {state.global_step} steps)", flush=True)
            stages.reuse(name)
            return latest
    stages.command(
        name,
        [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "clmae.train"]
        + ["--config", args.data.config, *pretrain_overrides(args, method, seed, epochs)],
        OMP_NUM_THREADS="1",
    )
    latest = find_latest(run_dir)
    if latest is None:
        sys.exit(f"compare_masking: '{name}' left no complete checkpoint in {run_dir}")
    return latest


def random_encoder(args: argparse.Namespace, method: Method, seed: int, stages: Stages) -> Path:
    """The encoder before training, as the pre-training runs initialise it (seeded), as a weights file."""
    path = args.out_dir / run_name(method, seed) / f"encoder_seed{seed}.safetensors"
    name = f"initialise a random encoder, seed {seed}"
    if path.is_file():
        stages.reuse(name)
        return path
    started = time.perf_counter()
    try:
        import torch
        from safetensors.torch import save_file

        from clmae.config import load_config
        from clmae.models import build_mae

        model = load_config(args.data.config, pretrain_overrides(args, method, seed, args.epochs)).model
        torch.manual_seed(seed)  # as clmae.train, just before it builds the models
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(build_mae(model.name, model.img_size, model.mask_ratio).encoder_state_dict(), path)
    except Exception as err:
        sys.exit(f"compare_masking: '{name}' failed: {err}")
    print(f"\n=== {name}: {path}", flush=True)
    stages.record(name, time.perf_counter() - started)
    return path


def evaluate(args: argparse.Namespace, method: Method, seed: int, checkpoint: Path, stages: Stages) -> dict[str, dict]:
    """{protocol: clmae-eval's JSON report}; a report of the same checkpoint is reused."""
    results = {}
    for protocol in PROTOCOLS:
        out = args.out_dir / run_name(method, seed) / f"{protocol}.json"
        name = f"evaluate {method.label}, seed {seed}: {protocol}"
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


def row_metrics(reports: dict[str, dict]) -> dict[str, float]:
    """One pre-trained encoder's numbers: few-shot top-1 (mean over probe seeds) per shot count, then k-NN."""
    fewshot, knn = reports["fewshot"]["results"], reports["knn"]["results"]
    metrics = {f"{n}-shot": fewshot[f"fewshot_{n}shot/top1_mean"] for n in reports["fewshot"]["settings"]["shots"]}
    metrics.update({KNN_LABELS.get(key, key): value for key, value in knn.items()})
    return metrics


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over pre-training seeds; std is the sample standard deviation (0 for one seed)."""
    metrics = next(iter(per_seed.values()))
    out = {}
    for key in metrics:
        values = [row[key] for row in per_seed.values()]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def markdown_table(header: list[str], rows: dict[str, list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows.items()]
    return "\n".join(lines)


def arm_table(results: dict[str, dict[int, dict[str, float]]], epochs: dict[str, int]) -> str:
    """One row per arm: mean +- std over pre-training seeds."""
    rows = {}
    for label, per_seed in results.items():
        stats = aggregate(per_seed)
        name = f"{label} ({epochs[label]} ep)" if epochs.get(label) else label
        seeds = f"{len(per_seed)} seed{'s' if len(per_seed) > 1 else ''}"
        rows[f"{name}, {seeds}"] = [f"{mean:.1f} +- {std:.1f}" for mean, std in stats.values()]
    metrics = list(next(iter(next(iter(results.values())).values())))
    return markdown_table(["arm", *metrics], rows)


def seed_table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    rows = {
        f"{label}, seed {seed}": [f"{value:.1f}" for value in metrics.values()]
        for label, per_seed in results.items()
        for seed, metrics in per_seed.items()
    }
    metrics = list(next(iter(next(iter(results.values())).values())))
    return markdown_table(["arm, pre-training seed", *metrics], rows)


def cost_table(results, epochs: dict[str, int], flops: dict[str, float], stages: Stages) -> str:
    """Per arm: epochs, counted training FLOPs per image (one iteration, and the whole run relative to the paper's
    CL-MAE run), and the pre-training's wall time, mean over the seeds that ran it."""
    seconds: dict[str, list[float]] = {}
    for stage in stages.done:
        if stage["stage"].startswith("pre-train ") and stage["seconds"] is not None:
            label = stage["stage"].removeprefix("pre-train ").rsplit(", ", 2)[0]
            seconds.setdefault(label, []).append(stage["seconds"])
    rows = {}
    for label in results:
        run = epochs[label] * flops[label]
        took = seconds.get(label)
        rows[label] = [
            str(epochs[label]),
            f"{flops[label] / 1e6:.0f}" if flops[label] else "-",
            f"{run / flops['paper run']:.2f}" if run else "-",
            f"{statistics.fmean(took) / 60:.1f}" if took else "-",
        ]
    header = ["arm", "epochs", "MFLOP per image and iteration", "run FLOPs / paper's CL-MAE run", "pre-training min"]
    return "Compute, counted (clmae.masking.iteration_flops):\n\n" + markdown_table(header, rows)


def machine() -> dict[str, str | int | None]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": version("torch"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_results(args, results, checkpoints, epochs, flops, probe_seeds, stages, started, complete) -> str:
    host = machine()
    title = (
        ("" if complete else "PARTIAL (arms still running): ")
        + f"{args.data.label} validation, top-1 %, mean +- std over pre-training seeds "
        + f"(few-shot: each seed's mean over {probe_seeds} probe seeds); "
        + f"{args.data.config}, seeds {' '.join(map(str, args.seeds))}"
        + (f", overrides: {' '.join(args.overrides)}" if args.overrides else "")
    )
    compute = cost_table(results, epochs, flops, stages)
    where = (
        f"machine: {host['cpu_count']} CPUs ({host['cpus_usable']} usable), torch {host['torch']}, "
        f"deepspeed {host['deepspeed']}, Python {host['python']}, {host['platform']}"
    )
    total, work = time.perf_counter() - started, stages.total()
    summary = f"total: {total / 60:.1f} min" + (
        f" (with the reused stages' earlier times: {work / 60:.1f} min)" if work > total + 1 else ""
    )
    table = arm_table(results, epochs)
    text = "\n".join(
        [
            title,
            "",
            table,
            "",
            compute,
            "",
            "Each pre-training seed:",
            "",
            seed_table(results),
            "",
            where,
            "",
            *stages.table(),
            "",
            summary,
        ]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text + "\n")
    report = {
        "complete": complete,
        "dataset": args.dataset,
        "config": args.data.config,
        "epochs": epochs,
        "seeds": args.seeds,
        "flops_per_image": flops,
        "overrides": args.overrides,
        "data_dir": str(args.data_dir),
        "machine": host,
        "checkpoints": checkpoints,
        "results": {label: {str(seed): m for seed, m in per_seed.items()} for label, per_seed in results.items()},
        "mean_std": {label: aggregate(per_seed) for label, per_seed in results.items()},
        "stages": stages.done,
        "total_seconds": round(total, 1),
        "total_seconds_with_reused": round(work, 1),
        "table": table,
    }
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    stages = Stages(args.out_dir / "results.json")
    prepare_data(args, stages)
    arms = methods(args)
    epochs, flops = arm_flops(args, arms)
    for arm in arms:
        if arm.equal_flops_to is not None:
            print(f"equal FLOPs: {arm.label}: {epochs[arm.label]} epochs", flush=True)
    results: dict[str, dict[int, dict[str, float]]] = {}
    checkpoints: dict[str, str] = {}
    trained: dict[tuple, tuple[str, Path, dict]] = {}  # (overrides, epochs, seed) -> (label, checkpoint, reports)
    for seed in args.seeds:  # every arm of a seed first: a partial result compares arms
        for method in arms:  # the random encoder first: a broken evaluation shows before any pre-training
            same = (method.overrides, epochs[method.label], seed)
            if method.overrides and same in trained:
                # Equal-FLOPs MAE arms of settings that cost the same are one training: it is not repeated.
                first_label, checkpoint, reports = trained[same]
                print(f"\n=== {method.label}, seed {seed}: the same training as {first_label}", flush=True)
            else:
                if method.overrides:
                    checkpoint = pretrain(args, method, seed, epochs[method.label], stages)
                else:
                    checkpoint = random_encoder(args, method, seed, stages)
                reports = evaluate(args, method, seed, checkpoint, stages)
                trained[same] = (method.label, checkpoint, reports)
            checkpoints[f"{method.label}, seed {seed}"] = str(checkpoint)
            probe_seeds = len(reports["fewshot"]["settings"]["seeds"])
            results.setdefault(method.label, {})[seed] = row_metrics(reports)
            write_results(args, results, checkpoints, epochs, flops, probe_seeds, stages, started, complete=False)
    text = write_results(args, results, checkpoints, epochs, flops, probe_seeds, stages, started, complete=True)
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78)
    print(f"written: {args.out_dir / 'results.md'}, {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()

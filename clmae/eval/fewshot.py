"""Few-shot linear probing: the linear probe on 1, 2, 4, 8, 16 labelled training images per class, each
shot count on 3 seeded subsets, evaluated on the whole validation set (another file: disjoint from the
labelled images), reported as mean and sample standard deviation over the seeds.

Subsets are class-balanced and nested: for one seed, each class's images are put in a seeded random order
and the first `shots` taken, so the 2-shot subset contains the 1-shot one.
"""

from __future__ import annotations

import re
import statistics

import torch
from torch import Tensor

from clmae.errors import ClmaeError
from clmae.eval.linprobe import accuracy, add_probe_arguments, probe_kwargs, probe_settings, train_linear_probe
from clmae.eval.protocol import DatasetMismatchError, EvalContext, Protocol, aligned

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)


class FewShotError(ClmaeError, ValueError):
    """The labelled set cannot give the requested subsets."""


def balanced_subset(labels: Tensor, shots: int, seed: int, num_classes: int) -> Tensor:
    """Indices (num_classes * shots,), sorted, of `shots` images of every class of labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().flatten().cpu()
        if members.numel() < shots:
            raise FewShotError(f"class {cls} has {members.numel()} training images, fewer than {shots} shots")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def run_fewshot(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    shots: tuple[int, ...] = SHOTS,
    seeds: tuple[int, ...] = SEEDS,
    **kwargs,
) -> dict[str, float]:
    """{"fewshot_{n}shot/top1_mean": %, "..._std": %, "..._seed{s}": %} for every shot count n and seed s.

    probe_kwargs go to `train_linear_probe` (epochs, warmup_epochs, batch_size, base_lr, lr_rule).
    """
    from clmae import dist

    results: dict[str, float] = {}
    for n in shots:
        runs = []
        for seed in seeds:
            subset = balanced_subset(train_labels, n, seed, num_classes).to(train_features.device)
            probe = train_linear_probe(train_features[subset], train_labels[subset], num_classes, seed=seed, **kwargs)
            top1 = accuracy(probe, test_features, test_labels)["top1"]
            results[f"fewshot_{n}shot/top1_seed{seed}"] = top1
            runs.append(top1)
        results[f"fewshot_{n}shot/top1_mean"] = statistics.fmean(runs)
        results[f"fewshot_{n}shot/top1_std"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
        dist.log(f"{n}-shot: {results[f'fewshot_{n}shot/top1_mean']:.2f} +- {results[f'fewshot_{n}shot/top1_std']:.2f}")
    return results


# --------------------------------------------------------------------------------------------------
# The protocol (clmae-eval fewshot)
# --------------------------------------------------------------------------------------------------


def _add_arguments(parser) -> None:
    add_probe_arguments(parser)
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))


def _check(args, cfg) -> None:
    from pathlib import Path

    if Path(cfg.data.train_path).resolve() == Path(cfg.data.val_path).resolve():
        raise DatasetMismatchError(
            f"few-shot draws its labelled images from data.train_path and evaluates on data.val_path; both are "
            f"{cfg.data.train_path}, so evaluation images could be among the labelled ones"
        )


def _run(ctx: EvalContext) -> dict[str, float]:
    train, val = ctx.train_and_val_features()
    if not ctx.env.is_main:
        return {}
    settings = ctx.settings
    return run_fewshot(
        train.cls,
        train.labels,
        val.cls,
        val.labels,
        ctx.num_classes,
        tuple(settings["shots"]),
        tuple(settings["seeds"]),
        **probe_kwargs(settings),
    )


def format_table(results: dict[str, float]) -> str:
    """One `shots  mean +- std` line per shot count, in increasing order."""
    shots = sorted({int(re.match(r"fewshot_(\d+)shot/", key).group(1)) for key in results})
    rows = [("shots", "top-1 % (mean +- std)")]
    rows += [
        (str(n), f"{results[f'fewshot_{n}shot/top1_mean']:.2f} +- {results[f'fewshot_{n}shot/top1_std']:.2f}")
        for n in shots
    ]
    return aligned(rows)


PROTOCOL = Protocol(
    name="fewshot",
    help="linear probe on 1, 2, 4, 8, 16 labelled images per class, 3 seeds, mean +- std",
    add_arguments=_add_arguments,
    settings=lambda args, source: probe_settings(args) | {"shots": list(args.shots), "seeds": list(args.seeds)},
    run=_run,
    check=_check,
    format_table=format_table,
)

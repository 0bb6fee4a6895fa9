"""A test-only evaluation protocol, outside the package: proves that adding one to `clmae-eval` takes one module.

Registered through the environment, as a user's own protocol would be:
    CLMAE_EVAL_PLUGINS=tests.eval_plugin:PROTOCOL clmae-eval centroid runs/tiny_digits --metric cosine

Nearest class centroid on the frozen CLS features: each class is the mean of its training features, a
validation image gets the class of the nearest centroid (L2, or cosine with --metric cosine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clmae.eval.protocol import EvalContext, Protocol


def nearest_centroid(train, train_labels, test, num_classes: int, metric: str):
    """train: (N, D), train_labels: (N,), test: (M, D) -> predictions (M,)."""
    sums = torch.zeros(num_classes, train.shape[1]).index_add_(0, train_labels, train)
    centroids = sums / torch.bincount(train_labels, minlength=num_classes).clamp(min=1)[:, None]
    if metric == "cosine":
        return (F.normalize(test, dim=1) @ F.normalize(centroids, dim=1).T).argmax(dim=1)
    return torch.cdist(test, centroids).argmin(dim=1)


def _add_arguments(parser) -> None:
    parser.add_argument("--metric", choices=("l2", "cosine"), default="l2")


def _run(ctx: EvalContext) -> dict[str, float]:
    train, val = ctx.train_and_val_features(device="cpu")
    if not ctx.env.is_main:
        return {}
    metric = ctx.settings["metric"]
    predictions = nearest_centroid(train.cls, train.labels, val.cls, ctx.num_classes, metric)
    return {f"centroid_{metric}/top1": 100.0 * (predictions == val.labels).float().mean().item()}


PROTOCOL = Protocol(
    name="centroid",
    help="nearest class centroid on frozen CLS features (a test-only protocol)",
    add_arguments=_add_arguments,
    settings=lambda args, source: {"metric": args.metric, "feature": "cls"},
    run=_run,
)

"""The CL-MAE reference's k-NN (main_zeroshot.py / engine_zeroshot.py, SPEC section 9), exactly.

Feature: the reference builds its ViT with `global_pool=True`, which deletes the encoder's final norm and
applies a fresh `fc_norm` (LayerNorm, eps 1e-6 as every norm of its ViTs, unit weight and zero bias: the
pre-trained checkpoint has no fc_norm, so it stays at its initialisation) to the mean of the patch tokens.
That is `F.layer_norm(mean of the pre-norm patch tokens, eps=1e-6)` without affine parameters.

Classification: the Euclidean distance to every training image, the k = 5 nearest vote, and the prediction
is `torch.mode` of their labels: the most frequent label, a tie going to the smallest class index.
"Acc@1" counts a right prediction, "any of 5" (the reference's "Acc NN") a right label among the 5.

Differences that remain: features are computed under bf16 autocast on GPU (the reference: fp16) and in fp32
on CPU; accuracies are in % (the reference prints fractions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clmae.eval.protocol import EvalContext, Protocol, metric_table, no_arguments

K = 5
LAYER_NORM_EPS = 1e-6  # models_vit.py: norm_layer=partial(nn.LayerNorm, eps=1e-6), also for fc_norm
CHUNK = 1024


def reference_features(patch_mean_prenorm: Tensor) -> Tensor:
    """(N, D) mean of the pre-norm patch tokens -> (N, D) the reference's feature: LayerNorm, no affine."""
    return F.layer_norm(patch_mean_prenorm, patch_mean_prenorm.shape[-1:], eps=LAYER_NORM_EPS)


@torch.no_grad()
def majority_smallest(labels: Tensor, num_classes: int) -> Tensor:
    """labels: (M, k) -> (M,) the most frequent label of each row, a tie going to the smallest label
    (what torch.mode returns; counted explicitly so that the rule does not depend on a kernel)."""
    votes = torch.zeros(labels.shape[0], num_classes, dtype=torch.int64, device=labels.device)
    votes.scatter_add_(1, labels, torch.ones_like(labels))
    return votes.argmax(dim=1)  # argmax returns the first (smallest) index among equal maxima


@torch.no_grad()
def reference_knn(
    train: Tensor, train_labels: Tensor, test: Tensor, k: int = K, chunk: int = CHUNK
) -> tuple[Tensor, Tensor]:
    """train: (N, D), train_labels: (N,), test: (M, D), already the reference's features ->
    (predictions (M,), neighbour labels (M, k), nearest first)."""
    num_classes = int(train_labels.max()) + 1
    k = min(k, train.shape[0])
    predictions, neighbours = [], []
    for start in range(0, test.shape[0], chunk):
        distances = torch.cdist(test[start : start + chunk], train)  # (m, N)
        labels = train_labels[distances.topk(k, dim=1, largest=False).indices]  # (m, k), ascending distance
        predictions.append(majority_smallest(labels, num_classes))
        neighbours.append(labels)
    return torch.cat(predictions), torch.cat(neighbours)


def evaluate_reference(train_features, test_features) -> dict[str, float]:
    """The reference protocol on clmae.eval.features.Features of a training and a test set; accuracies in %."""
    predictions, neighbours = reference_knn(
        reference_features(train_features.patch_mean_prenorm),
        train_features.labels,
        reference_features(test_features.patch_mean_prenorm),
    )
    truth = test_features.labels
    return {
        "knn_reference/acc1": 100.0 * (predictions == truth).float().mean().item(),
        "knn_reference/any_of_5": 100.0 * (neighbours == truth[:, None]).any(dim=1).float().mean().item(),
    }


SETTINGS = {
    "feature": f"LayerNorm(eps={LAYER_NORM_EPS}, no affine) of the mean of the patch tokens before the final norm",
    "distance": "l2",
    "k": K,
    "vote": "majority (torch.mode): ties go to the smallest class index",
}


def _run(ctx: EvalContext) -> dict[str, float]:
    train, val = ctx.train_and_val_features()
    return evaluate_reference(train, val) if ctx.env.is_main else {}


PROTOCOL = Protocol(
    name="knn_reference",
    help="k-NN exactly as the CL-MAE reference: LayerNorm(mean pre-norm patch tokens), L2, k=5, majority (ties to "
    "the smallest class) + any of 5",
    add_arguments=no_arguments,
    settings=lambda args, source: dict(SETTINGS),
    run=_run,
    format_table=metric_table,
)

"""k-nearest-neighbour classification of frozen features (SPEC section 8): the `knn` protocol reports

- `knn_reference/*`: the CL-MAE reference's protocol, exactly (clmae/eval/knn_reference.py, also its own
  `knn_reference` protocol): LayerNorm of the pre-norm mean patch token, L2, k = 5, ties to the smallest class.
- `knn_l2_k5/*` (`l2_majority`, this project's earlier variant of it, kept for comparison with earlier
  results): the mean of the patch tokens AFTER the encoder's final norm, Euclidean distance, the k = 5
  nearest training images vote, one vote each; a tied vote goes to the tied class whose member is nearest.
  "acc1" (the vote is right) and "any_of_5" (the label is among the 5 neighbours').
- `cosine_weighted` (the usual one since DINO / InstDisc): L2-normalised CLS features, cosine similarity,
  the k = 20 most similar training images vote with weight exp(similarity / T), T = 0.07. Top-1 and top-5
  of the summed votes.

The test set is processed in chunks, so the distance matrix never exceeds chunk x N_train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clmae.eval.knn_reference import SETTINGS as REFERENCE_SETTINGS
from clmae.eval.knn_reference import K as REFERENCE_K
from clmae.eval.knn_reference import evaluate_reference
from clmae.eval.linprobe import topk_accuracy
from clmae.eval.protocol import EvalContext, Protocol, metric_table, no_arguments

COSINE_K = 20
COSINE_TEMPERATURE = 0.07
CHUNK = 1024


@torch.no_grad()
def l2_majority(
    train: Tensor, train_labels: Tensor, test: Tensor, k: int = REFERENCE_K, chunk: int = CHUNK
) -> tuple[Tensor, Tensor]:
    """train: (N, D), train_labels: (N,), test: (M, D) -> (predictions (M,), neighbour labels (M, k), nearest first)."""
    predictions, neighbours = [], []
    k = min(k, train.shape[0])
    num_classes = int(train_labels.max()) + 1
    # Rank r adds k - r: less than one vote, so only ties are decided by it, in favour of the nearest.
    nearness = torch.arange(k, 0, -1, dtype=torch.float32, device=train.device) / (k + 1)
    for start in range(0, test.shape[0], chunk):
        distances = torch.cdist(test[start : start + chunk], train)  # (m, N)
        nearest = distances.topk(k, dim=1, largest=False).indices  # (m, k), ascending distance
        labels = train_labels[nearest]
        votes = torch.zeros(labels.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
        first_seen = torch.zeros_like(votes).scatter_reduce_(1, labels, nearness.expand_as(labels), reduce="amax")
        predictions.append((votes + first_seen).argmax(dim=1))
        neighbours.append(labels)
    return torch.cat(predictions), torch.cat(neighbours)


@torch.no_grad()
def cosine_weighted(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = COSINE_K,
    temperature: float = COSINE_TEMPERATURE,
    chunk: int = CHUNK,
) -> Tensor:
    """train: (N, D), train_labels: (N,), test: (M, D) -> class scores (M, C): sum of exp(cos / T) of the
    k most similar training images of each class."""
    train = F.normalize(train, dim=1)
    scores = []
    for start in range(0, test.shape[0], chunk):
        similarity = F.normalize(test[start : start + chunk], dim=1) @ train.T  # (m, N)
        top = similarity.topk(min(k, train.shape[0]), dim=1)
        weights = (top.values / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=train.device)
        scores.append(votes.scatter_add_(1, train_labels[top.indices], weights))
    return torch.cat(scores)


def evaluate_knn(train_features, test_features, num_classes: int) -> dict[str, float]:
    """The three k-NN protocols on `clmae.eval.features.Features` of a training and a test set; accuracies in %."""
    predictions, neighbours = l2_majority(train_features.patch_mean, train_features.labels, test_features.patch_mean)
    truth = test_features.labels
    scores = cosine_weighted(train_features.cls, train_features.labels, test_features.cls, num_classes)
    cosine = topk_accuracy(scores, truth)
    results = evaluate_reference(train_features, test_features)
    results |= {
        "knn_l2_k5/acc1": 100.0 * (predictions == truth).float().mean().item(),
        "knn_l2_k5/any_of_5": 100.0 * (neighbours == truth[:, None]).any(dim=1).float().mean().item(),
    }
    results.update({f"knn_cosine_k20/{name}": value for name, value in cosine.items()})
    return results


def _run(ctx: EvalContext) -> dict[str, float]:
    train, val = ctx.train_and_val_features()
    return evaluate_knn(train, val, ctx.num_classes) if ctx.env.is_main else {}


PROTOCOL = Protocol(
    name="knn",
    help="k-NN: the reference's (LayerNorm of pre-norm mean patches, L2, k=5, majority + any of 5), our post-norm "
    "L2 k=5 variant, and weighted cosine (k=20, T=0.07)",
    add_arguments=no_arguments,
    settings=lambda args, source: {
        "reference": dict(REFERENCE_SETTINGS),
        "l2_k": REFERENCE_K,
        "l2_feature": "mean of the patch tokens after the final norm; ties to the class with the nearest member",
        "cosine_k": COSINE_K,
        "cosine_temperature": COSINE_TEMPERATURE,
        "cosine_feature": "CLS token after the final norm",
    },
    run=_run,
    format_table=metric_table,
)

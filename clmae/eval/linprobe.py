"""The MAE linear-probe recipe (SPEC section 8) on precomputed frozen features.

Classifier: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, C), the head initialised with
trunc_normal(std=0.01) and zero bias (MAE's main_linprobe). Optimiser: LARS (timm's `Lars`), momentum 0.9,
trust coefficient 0.001, weight decay 0, the layer-wise adaptation on the weight matrix only (MAE's LARS
skips 1-D parameters: here the bias is a plain momentum-SGD group); lr = base_lr * batch / 256, linear warmup
then half-cycle cosine to 0, set every step.

Differences from MAE's recipe, on purpose:
- The features are those of the evaluation crop (resize + centre crop), computed once; MAE's training
  augmentation (RandomResizedCrop + flip) would need the encoder in the loop for every epoch. With a frozen
  encoder this changes little and makes 90 epochs cost one forward pass.
- When the set is smaller than the batch (few-shot, small data sets), each step takes the whole set. Its
  gradient is what a batch of `batch_size` drawn from the set would give, so the lr of `batch_size` is kept
  rather than shrunk with the number of images: LARS moves a weight by lr * trust relative to its norm, and
  lr = 0.1 * 10 / 256 would leave a 1-shot probe at its initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clmae import dist
from clmae.ds_engines import WarmupCosine

BASE_LR = 0.1
BATCH_SIZE = 16384
EPOCHS = 90
WARMUP_EPOCHS = 10
MOMENTUM = 0.9
TRUST_COEFF = 0.001


class LinearProbe(nn.Sequential):
    """features (B, D) -> logits (B, C): BatchNorm1d without affine, then Linear."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01, generator=generator)
        nn.init.zeros_(self[1].bias)


def lars_optimizer(probe: LinearProbe, lr: float) -> torch.optim.Optimizer:
    from timm.optim import Lars

    head = probe[1]
    # timm's Lars adapts only when weight decay != 0 unless always_adapt: adapt the matrix, not the bias.
    groups = [{"params": [head.weight], "always_adapt": True}, {"params": [head.bias], "always_adapt": False}]
    return Lars(groups, lr=lr, momentum=MOMENTUM, weight_decay=0.0, trust_coeff=TRUST_COEFF)


def train_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = EPOCHS,
    warmup_epochs: float = WARMUP_EPOCHS,
    batch_size: int = BATCH_SIZE,
    base_lr: float = BASE_LR,
    seed: int = 0,
    show_progress: bool = False,
) -> LinearProbe:
    """Train a probe on features (N, D) with labels (N,) in [0, num_classes); returns it in eval mode.

    `seed` fixes the initial weights and the batches, drawn from a permutation per epoch with the last
    partial batch dropped (as MAE's loader), and at least one batch (the whole set) per epoch. Runs on the
    features' device.
    """
    device = features.device
    num_samples = features.shape[0]
    step_batch = min(batch_size, num_samples)
    steps_per_epoch = num_samples // step_batch
    peak = base_lr * batch_size / 256
    # One seeded stream for the initial weights and the batch order: the same features and seed give the
    # same probe in any process.
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(features.shape[1], num_classes, generator).to(device)
    optimizer = lars_optimizer(probe, peak)
    schedule = WarmupCosine(peak, 0.0, warmup_epochs, epochs, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    step = 0
    epoch_range = range(epochs)
    if show_progress:
        epoch_range = dist.progress(epoch_range, desc="linear probe", unit="epoch")
    for _ in epoch_range:
        order = torch.randperm(num_samples, generator=generator).to(device)
        for batch in order[: steps_per_epoch * step_batch].view(steps_per_epoch, step_batch):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            loss = loss_fn(probe(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def accuracy(classifier: nn.Module, features: Tensor, labels: Tensor, chunk: int = 65536) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 only with at least 5 classes)."""
    logits = torch.cat([classifier(features[i : i + chunk]) for i in range(0, features.shape[0], chunk)])
    return topk_accuracy(logits, labels)


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """scores: (N, C), labels: (N,) -> {"top1": %, "top5": %}; a label is in the top k if its score is."""
    ks = (1, 5) if scores.shape[1] >= 5 else (1,)
    top = scores.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}

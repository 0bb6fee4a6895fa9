"""The MAE linear-probe recipe (SPEC section 8) on precomputed frozen features.

Classifier: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, C), the head initialised with
trunc_normal(std=0.01) and zero bias (MAE's main_linprobe). Optimiser: LARS (timm's `Lars`), momentum 0.9,
trust coefficient 0.001, weight decay 0, the layer-wise adaptation on the weight matrix only (MAE's LARS
skips 1-D parameters: here the bias is a plain momentum-SGD group); linear warmup then half-cycle cosine
to 0, set every step. The peak lr follows `--lr-rule`:
- `mae` (default, MAE's main_linprobe): base_lr * batch / 256, i.e. 0.1 * 16384 / 256 = 6.4;
- `reference` (the CL-MAE reference's main_linprobe): base_lr itself, 0.1 whatever the batch.

Training images, `--augment`:
- off (default, fast): the probe trains on cached features of the evaluation crop (resize + centre crop),
  computed once, so 90 epochs cost one forward pass;
- on (MAE's recipe): every epoch, RandomResizedCrop (scale 0.08-1) + flip through the FFCV pre-training
  loader, the frozen encoder in the loop on every rank; the probe's gradients are averaged over ranks
  (each rank's BatchNorm uses its own batch statistics, as MAE's DDP probe does; the running statistics
  are averaged over ranks at the end).
Validation always uses the cached centre-crop features.

Differences from MAE's recipe, on purpose:
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
from clmae.eval.protocol import EvalContext, Protocol, metric_table

BASE_LR = 0.1
BATCH_SIZE = 16384
EPOCHS = 90
WARMUP_EPOCHS = 10
MOMENTUM = 0.9
TRUST_COEFF = 0.001
LR_RULES = ("mae", "reference")
AUGMENT_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as MAE's main_linprobe


def peak_lr(base_lr: float, batch_size: int, rule: str = "mae") -> float:
    """The probe's peak lr: `mae` scales base_lr by batch / 256, `reference` uses base_lr as it is."""
    if rule == "mae":
        return base_lr * batch_size / 256
    if rule == "reference":
        return base_lr
    raise ValueError(f"lr rule {rule!r}: expected one of {', '.join(LR_RULES)}")


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
    lr_rule: str = "mae",
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
    peak = peak_lr(base_lr, batch_size, lr_rule)
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


# --------------------------------------------------------------------------------------------------
# MAE's training augmentation: the frozen encoder in the loop (--augment)
# --------------------------------------------------------------------------------------------------


def _all_reduce_mean_(tensors) -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        for tensor in tensors:
            tdist.all_reduce(tensor)
            tensor.div_(tdist.get_world_size())


def augmented_loader(ctx: EvalContext, batch_size: int):
    """The FFCV pre-training loader over data.train_path with MAE's probe crops, `batch_size` images per
    optimiser step over all ranks (at most the whole set, as the cached probe)."""
    from dataclasses import replace

    from clmae.config import ConfigError
    from clmae.data import build_pretrain_loader
    from data_prep.verify import BetonFile

    cfg, world = ctx.cfg, ctx.env.world_size
    per_rank = min(batch_size, len(BetonFile(cfg.data.train_path).labels)) // world
    if per_rank < 1:
        raise ConfigError(f"--batch-size {batch_size} gives no image per rank on {world} ranks")
    data = replace(cfg.data, batch_size=per_rank, crop_scale=AUGMENT_CROP_SCALE)
    return build_pretrain_loader(replace(cfg, data=data), ctx.env, ctx.env.device, img_size=ctx.source.img_size)


def train_augmented_probe(ctx: EvalContext, settings: dict, seed: int = 0) -> LinearProbe:
    """The probe on CLS features of freshly augmented crops every epoch; collective (every rank trains the
    same probe on its share and averages the gradients). Returns it in eval mode."""
    from clmae.eval.features import encode

    device = torch.device(ctx.env.device)
    loader = augmented_loader(ctx, settings["batch_size"])
    encoder = ctx.encoder().eval()
    generator = torch.Generator().manual_seed(seed)  # the same initial probe on every rank
    probe = LinearProbe(encoder.embed_dim, ctx.num_classes, generator).to(device).train()
    peak = peak_lr(settings["base_lr"], settings["batch_size"], settings["lr_rule"])
    optimizer = lars_optimizer(probe, peak)
    schedule = WarmupCosine(peak, 0.0, settings["warmup_epochs"], settings["epochs"], len(loader))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_fn, step = nn.CrossEntropyLoss(), 0
    for epoch in dist.progress(range(settings["epochs"]), desc="linear probe (augmented)", unit="epoch"):
        for images, labels in loader.iterate_epoch(epoch):
            with torch.no_grad(), autocast:
                cls = encode(encoder, images)[0]
            loss = loss_fn(probe(cls.float()), labels.to(device, dtype=torch.int64, copy=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_mean_([p.grad for p in probe.parameters()])
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            optimizer.step()
            step += 1
    _all_reduce_mean_([probe[0].running_mean, probe[0].running_var])
    return probe.eval()


# --------------------------------------------------------------------------------------------------
# The protocol (clmae-eval linprobe); the probe options are also fewshot's
# --------------------------------------------------------------------------------------------------


def add_probe_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="global batch (default 16384, MAE's)")
    parser.add_argument("--base-lr", type=float, default=BASE_LR)
    parser.add_argument(
        "--lr-rule",
        choices=LR_RULES,
        default="mae",
        help="peak lr: mae = base_lr * batch / 256 (MAE's recipe); reference = base_lr flat (CL-MAE's code)",
    )


def probe_settings(args) -> dict:
    settings = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "base_lr", "lr_rule")}
    return settings | {"peak_lr": peak_lr(args.base_lr, args.batch_size, args.lr_rule)}


def probe_kwargs(settings: dict) -> dict:
    """The keyword arguments of train_linear_probe among a protocol's settings."""
    return {k: settings[k] for k in ("epochs", "warmup_epochs", "batch_size", "base_lr", "lr_rule")}


def _add_arguments(parser) -> None:
    add_probe_arguments(parser)
    parser.add_argument(
        "--augment",
        action="store_true",
        help="MAE's training augmentation (RandomResizedCrop + flip, encoder in the loop every epoch) instead of "
        "cached centre-crop features",
    )


def _settings(args, source) -> dict:
    images = "random_resized_crop_flip" if args.augment else "cached_center_crop"
    return probe_settings(args) | {"train_images": images, "val_images": "cached_center_crop"}


def _run(ctx: EvalContext) -> dict[str, float]:
    if ctx.settings["train_images"] == "random_resized_crop_flip":
        probe = train_augmented_probe(ctx, ctx.settings)
        val = ctx.features(ctx.cfg.data.val_path).to(ctx.env.device)
        if not ctx.env.is_main:
            return {}
    else:
        train, val = ctx.train_and_val_features()
        if not ctx.env.is_main:
            return {}
        probe = train_linear_probe(
            train.cls, train.labels, ctx.num_classes, show_progress=True, **probe_kwargs(ctx.settings)
        )
    return {f"linprobe/{k}": v for k, v in accuracy(probe, val.cls, val.labels).items()}


PROTOCOL = Protocol(
    name="linprobe",
    help="MAE linear-probe recipe on frozen CLS features (BN + Linear, LARS); --lr-rule mae|reference, --augment; "
    "top-1 / top-5",
    add_arguments=_add_arguments,
    settings=_settings,
    run=_run,
    format_table=metric_table,
)

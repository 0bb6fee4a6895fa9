"""The MAE fine-tuning recipe (SPEC section 8) on a DeepSpeed engine, launched like pre-training.

Model: timm's VisionTransformer with the pre-trained encoder, global average pooling of the patch tokens
followed by a fresh LayerNorm (`fc_norm`; the encoder's final `norm` is dropped, as MAE does), a linear head
initialised with trunc_normal(std=2e-5), drop path. Optimiser: AdamW (betas 0.9, 0.999) with layer-wise lr
decay (timm's `param_groups_layer_decay`: each block's lr is scaled by decay ** (depth + 1 - its layer)),
weight decay 0.05 on matrices only, lr = base_lr * global batch / 256 with warmup then cosine to min_lr, no
gradient clipping.

Data, per batch: RandomResizedCrop(scale 0.08-1) + flip (the FFCV pre-training loader), RandAugment
rand-m9-mstd0.5-inc1 (timm's, per image on CPU PIL images: FFCV has no RandAugment; on GPU this round trip
is the price), random erasing 0.25 (timm, per image), then mixup 0.8 / cutmix 1.0 with label smoothing 0.1
(timm's Mixup and SoftTargetCrossEntropy). Evaluation: the centre crop, top-1 / top-5 over the whole
validation file after every epoch. No checkpoints: a fine-tuning run is short next to pre-training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from clmae import dist
from clmae.checkpoint import CheckpointError
from clmae.config import Config, ConfigError
from clmae.data import IMAGENET_MEAN, IMAGENET_STD
from clmae.ds_engines import WarmupCosine, build_ds_config, precision_dtype
from clmae.eval.protocol import EvalContext, Protocol, metric_table

FINETUNE_CROP_SCALE = (0.08, 1.0)


@dataclass
class FinetuneSettings:
    """MAE's fine-tuning hyper-parameters; `for_model` fills in the per-size ones of SPEC section 8."""

    epochs: int
    warmup_epochs: float
    base_lr: float
    min_lr: float
    layer_decay: float
    drop_path: float
    weight_decay: float = 0.05
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    randaug: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25

    @classmethod
    def for_model(cls, name: str) -> FinetuneSettings:
        """B: 100 epochs, decay 0.65, drop path 0.1, base lr 5e-4; L / H: 50 epochs, 0.75, 0.2 / 0.3, 1e-3.
        The CPU-sized vit_tiny gets 2 epochs, enough to see the loss fall on the digits."""
        table = {
            "vit_tiny": (2, 0.5, 1e-3, 0.65, 0.1),
            "vit_base_patch16": (100, 5, 5e-4, 0.65, 0.1),
            "vit_large_patch16": (50, 5, 1e-3, 0.75, 0.2),
            "vit_huge_patch14": (50, 5, 1e-3, 0.75, 0.3),
        }
        epochs, warmup, base_lr, layer_decay, drop_path = table[name]
        return cls(epochs, warmup, base_lr, 1e-6, layer_decay, drop_path)


def build_classifier(source, num_classes: int, drop_path: float) -> nn.Module:
    """timm ViT with global pool + fc_norm + head, the pre-trained encoder loaded (its final norm dropped)."""
    import timm

    model = timm.create_model(
        **{**source.timm_kwargs, "num_classes": num_classes, "global_pool": "avg", "drop_path_rate": drop_path}
    )
    encoder = {k: v for k, v in source.state.items() if not k.startswith("norm.")}
    result = model.load_state_dict(encoder, strict=False)
    expected_missing = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise CheckpointError(
            "encoder does not fit the fine-tuning model: missing "
            f"{sorted(set(result.missing_keys) - expected_missing)}, unexpected {result.unexpected_keys}"
        )
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


class RandAugmentBatch:
    """timm's RandAugment on every image of a normalised batch (B, 3, H, W), via uint8 PIL images."""

    def __init__(self, policy: str, img_size: int):
        from timm.data import auto_augment
        from timm.data.auto_augment import rand_augment_transform

        hparams = {
            "translate_const": int(img_size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
        }
        self.transform = rand_augment_transform(policy, hparams)
        for op in self.transform.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        from PIL import Image

        pixels = ((images.float().cpu() * self.std + self.mean) * 255).round().clamp(0, 255).to(torch.uint8)
        augmented = [np.asarray(self.transform(Image.fromarray(p))) for p in pixels.permute(0, 2, 3, 1).numpy()]
        out = torch.from_numpy(np.stack(augmented)).permute(0, 3, 1, 2).float().div_(255)
        return ((out - self.mean) / self.std).to(images.device, images.dtype).contiguous()


def _posterize_any_bits(img, bits_to_keep: int, **kwargs):
    """timm's posterize, also for 0 bits: the increasing policy asks for that at full magnitude, Pillow >= 11
    refuses it, and keeping no bit gives a black image (what older Pillow returned)."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _param_groups(model: nn.Module, settings: FinetuneSettings, peak: float) -> list[dict]:
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(
        model, settings.weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=settings.layer_decay
    )
    for group in groups:
        # The schedule multiplies each group's initial lr, so the layer's scale is applied once, here.
        group["lr"] = peak * group.pop("lr_scale")
    return groups


@torch.no_grad()
def evaluate(engine, loader, num_classes: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (%) over the whole validation file; every rank calls it with its share.

    Ranks whose share has a batch fewer run an extra forward on a dummy batch, because under ZeRO-3 every
    forward gathers parameters collectively."""
    engine.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    batches = torch.tensor([len(loader)], device=device)
    tdist.all_reduce(batches, op=tdist.ReduceOp.MAX)
    k = min(5, num_classes)
    seen = 0
    for images, labels in dist.progress(loader.iterate_epoch(0), total=len(loader), desc="fine-tune eval"):
        logits = engine(images.to(dtype)).float()
        top = logits.topk(k, dim=1).indices
        hits = top == labels.to(device)[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(labels.shape[0], device=device)])
        seen += 1
    for _ in range(int(batches.item()) - seen):
        engine(torch.zeros((1, 3, *engine.module.patch_embed.img_size), device=device, dtype=dtype))
    tdist.all_reduce(counts)
    engine.train()
    return {"top1": 100.0 * (counts[0] / counts[2]).item(), f"top{k}": 100.0 * (counts[1] / counts[2]).item()}


def finetune(source, cfg: Config, env, num_classes: int, settings: FinetuneSettings, tracker) -> dict[str, float]:
    """Fine-tune on `data.train_path`, evaluate on `data.val_path` each epoch; collective (every rank).
    Returns the last epoch's accuracies and the best top-1."""
    import deepspeed

    from clmae.data import build_eval_loader, build_pretrain_loader

    device = torch.device(env.device)
    train_cfg = replace(cfg, data=replace(cfg.data, crop_scale=FINETUNE_CROP_SCALE))
    loader = build_pretrain_loader(train_cfg, env, device, img_size=source.img_size)
    val_loader = build_eval_loader(cfg, env, device, img_size=source.img_size)
    steps_per_epoch = loader.batches_per_epoch // cfg.train.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} x train.accum_steps={cfg.train.accum_steps} x "
            f"{env.world_size} ranks needs more than the {loader.num_images} images of {cfg.data.train_path}"
        )
    mixing = settings.mixup > 0 or settings.cutmix > 0
    if mixing and cfg.data.batch_size % 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: mixup / cutmix pair images, it must be even")

    torch.manual_seed(cfg.run.seed)  # the same head on every rank
    model = build_classifier(source, num_classes, settings.drop_path).to(device)
    ds_config = build_ds_config(cfg, env.world_size, clip_grad=0.0)
    global_batch = ds_config["train_batch_size"]
    peak = settings.base_lr * global_batch / 256
    optimizer = torch.optim.AdamW(_param_groups(model, settings, peak), lr=peak, betas=(0.9, 0.999))
    schedule = WarmupCosine(peak, settings.min_lr, settings.warmup_epochs, settings.epochs, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    dtype = precision_dtype(ds_config)

    randaug, erasing, mixup, criterion = _augmentations(settings, source.img_size, num_classes, cfg, env)
    dist.log(
        f"fine-tuning {source.model_name} on {cfg.data.train_path}: {env.world_size} ranks, global batch "
        f"{global_batch}, lr {peak:.2e}, layer decay {settings.layer_decay}, drop path {settings.drop_path}, "
        f"{settings.epochs} epochs x {steps_per_epoch} steps"
    )

    best, last = 0.0, {}
    engine.train()
    for epoch in range(settings.epochs):
        batches = loader.iterate_epoch(epoch)
        loss_sum, micro_steps = torch.zeros((), device=device), 0
        total = steps_per_epoch * cfg.train.accum_steps
        for _ in dist.progress(range(total), desc=f"fine-tune epoch {epoch}"):
            images, labels = next(batches)
            labels = labels.to(device, dtype=torch.int64, copy=True)
            if randaug is not None:
                images = randaug(images)
            if erasing is not None:
                images = erasing(images)
            if mixup is not None:
                images, labels = mixup(images, labels)
            loss = criterion(engine(images.to(dtype)).float(), labels)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            micro_steps += 1
        batches.close()
        tdist.all_reduce(loss_sum)
        train_loss = (loss_sum / (micro_steps * env.world_size)).item()
        if not math.isfinite(train_loss):
            raise RuntimeError(f"fine-tuning diverged in epoch {epoch}: loss {train_loss}")
        last = evaluate(engine, val_loader, num_classes, dtype, device)
        best = max(best, last["top1"])
        dist.log(
            f"fine-tune epoch {epoch}: train loss {train_loss:.4f}, val top-1 {last['top1']:.2f}"
            + (f", top-5 {last['top5']:.2f}" if "top5" in last else "")
        )
        tracker.log_metrics(
            {"finetune/train_loss": train_loss, "finetune/lr": engine.get_lr()[0]}
            | {f"finetune/val_{k}": v for k, v in last.items()},
            step=epoch + 1,
        )
    return {f"finetune/{k}": v for k, v in last.items()} | {"finetune/best_top1": best}


def _augmentations(settings: FinetuneSettings, img_size: int, num_classes: int, cfg: Config, env):
    """(RandAugment, random erasing, Mixup/CutMix, criterion) of MAE's fine-tuning recipe; None where off."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixing = settings.mixup > 0 or settings.cutmix > 0
    # Per-rank augmentation streams (timm's RandAugment and Mixup draw from Python's and numpy's RNGs).
    seed = cfg.run.seed * 1000 + env.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    randaug = RandAugmentBatch(settings.randaug, img_size) if settings.randaug else None
    erasing = RandomErasing(settings.reprob, mode="pixel", device=env.device) if settings.reprob > 0 else None
    mixup = (
        Mixup(
            mixup_alpha=settings.mixup,
            cutmix_alpha=settings.cutmix,
            label_smoothing=settings.smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(settings.smoothing)
    return randaug, erasing, mixup, criterion


# --------------------------------------------------------------------------------------------------
# The protocol (clmae-eval finetune)
# --------------------------------------------------------------------------------------------------


def _add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="default: 100 (B), 50 (L, H), 2 (vit_tiny)")
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--base-lr", type=float, default=None, help="lr = base_lr * global batch / 256")
    parser.add_argument("--layer-decay", type=float, default=None, help="0.65 (B), 0.75 (L, H)")
    parser.add_argument("--drop-path", type=float, default=None, help="0.1 (B), 0.2 (L), 0.3 (H)")
    parser.add_argument("--mixup", type=float, default=None, help="mixup alpha (0.8)")
    parser.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (1.0)")
    parser.add_argument("--smoothing", type=float, default=None, help="label smoothing (0.1)")
    parser.add_argument("--randaug", default=None, help="timm RandAugment policy (rand-m9-mstd0.5-inc1); '' = off")
    parser.add_argument("--reprob", type=float, default=None, help="random erasing probability (0.25)")


def _settings(args, source) -> dict:
    """The model's defaults (FinetuneSettings.for_model), overridden by the options given."""
    from dataclasses import asdict

    settings = asdict(FinetuneSettings.for_model(source.model_name))
    return settings | {k: v for k, v in vars(args).items() if k in settings and v is not None}


def _run(ctx: EvalContext) -> dict[str, float]:
    return finetune(ctx.source, ctx.cfg, ctx.env, ctx.num_classes, FinetuneSettings(**ctx.settings), ctx.tracker)


PROTOCOL = Protocol(
    name="finetune",
    help="MAE fine-tuning recipe on DeepSpeed (layer decay, drop path, mixup/cutmix, RandAug, erasing)",
    add_arguments=_add_arguments,
    settings=_settings,
    run=_run,
    format_table=metric_table,
)

"""The losses of the two optimisation steps of one CL-MAE iteration, on the same batch (SPEC sections 3 and 6).

    loss, metrics = mae_step(mae, scorer, imgs, cfg)          # hard masks: the MAE's loss
    loss, metrics = cmm_step(mae, cmm, imgs, lam, cfg)        # soft masks: the CMM's loss

Each returns the loss to backpropagate; the caller runs backward and the optimiser step (clmae/step.py through
the engines, or plain torch in tests and benchmarks). `lam` comes from `clmae.curriculum.curriculum_factor`.
The masking strategy (clmae/masking.py) supplies the scorer of the hard masks: the CMM for curriculum, None for
plain MAE's random masks (which has no CMM step). Metrics are detached 0-d tensors on the batch's device:
nothing here waits on the device, the caller decides when to read them.

Under DeepSpeed pass the CMM step the MAE's plain module (`engine.module`), not its engine: the MAE is frozen in
that step, and its engine's gradient partitioning does not expect a forward without gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from clmae.config import Config
from clmae.losses import cmm_loss, reconstruction_loss, reconstruction_target
from clmae.models import CurriculumMaskingModule, MaskedAutoencoderViT


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of `module` takes part in the graphs built inside the block; flags are restored after.

    Autograd decides which leaves get a gradient when the graph is built, so a backward() after the block still
    gives these parameters none. Parameters that were already frozen (fixed position embeddings) stay frozen.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def mask_statistics(keep: Tensor) -> dict[str, Tensor]:
    """Summaries of the keep scores m (B, L): mean, std, fraction above 0.5 (visible if thresholded), and the
    mean binary entropy in bits (1 = undecided m = 0.5, 0 = binary masks)."""
    keep = keep.detach().float()
    entropy = -(torch.special.xlogy(keep, keep) + torch.special.xlogy(1 - keep, 1 - keep)) / math.log(2)
    return {
        "mask_mean": keep.mean(),
        "mask_std": keep.std(),
        "mask_above_half": (keep > 0.5).float().mean(),
        "mask_entropy": entropy.mean(),
    }


def mae_step(
    mae: MaskedAutoencoderViT, scorer: Callable[[Tensor], Tensor] | None, imgs: Tensor, cfg: Config
) -> tuple[Tensor, dict[str, Tensor]]:
    """The MAE's loss on hard masks: the top k of the scorer's keep scores (the CMM for curriculum), or
    uniform noise (scorer None).

    imgs: (B, 3, H, W). The scorer runs under no_grad inside the MAE's forward: no graph, no gradient reaches it.
    Returns the reconstruction loss over hidden patches and {"loss_rec"}.
    """
    pred, hidden, _ = mae(imgs, scorer)
    target = reconstruction_target(mae.patchify(imgs), cfg.model.norm_pix_loss)
    loss = reconstruction_loss(pred, target, hidden)
    return loss, {"loss_rec": loss.detach()}


def cmm_step(
    mae: MaskedAutoencoderViT, cmm: CurriculumMaskingModule, imgs: Tensor, curriculum_factor: float, cfg: Config
) -> tuple[Tensor, dict[str, Tensor]]:
    """The CMM's loss L_CMM on soft masks, with the MAE frozen (its parameters get no gradient from it).

    imgs: (B, 3, H, W); curriculum_factor: lambda of this iteration.
    Returns L_CMM and {"loss_cmm", "loss_rec_soft", "loss_gauss", "loss_kl", "loss_div", "lambda", "mask_*"}.
    """
    with frozen(mae):
        pred, hidden, keep = mae(imgs, cmm, soft=True)
    target = reconstruction_target(mae.patchify(imgs), cfg.model.norm_pix_loss)
    rec_soft = reconstruction_loss(pred, target, hidden)
    loss, terms = cmm_loss(rec_soft, keep, curriculum_factor, cfg.loss, cfg.model.mask_ratio)
    metrics = {name: value.detach() for name, value in terms.items()}
    metrics["loss_cmm"] = loss.detach()
    metrics["lambda"] = torch.full((), curriculum_factor, device=loss.device)
    metrics.update(mask_statistics(keep))
    return loss, metrics

"""CL-MAE's losses (SPEC sections 1, 3 and 4): the reconstruction loss and the CMM's regularisers.

m: (B, L) keep scores from the CMM, in (0, 1), high = keep visible. Every loss is computed in fp32, whatever
the autocast dtype of its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clmae.config import LossConfig

# The reference code's KL target (Bernoulli(0.25), i.e. 75 % hidden), whatever the mask ratio.
REFERENCE_KL_TARGET = 0.25

# Keeps log(mbar) finite when every m of an image saturates (the all-visible / all-hidden collapse that L_KL
# exists to prevent): a NaN there would poison the loss even with w_kl = 0.
_KL_EPS = 1e-6


def reconstruction_target(patches: Tensor, norm_pix: bool) -> Tensor:
    """patches: (B, L, P) -> target (B, L, P): the pixels, or with `norm_pix` each patch normalised."""
    patches = patches.float()  # the pixels, their mean and variance in fp32 whatever the engine's dtype
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


def reconstruction_loss(pred: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Per-patch MSE over the P values, averaged with weights `hidden`: sum(hidden * l) / sum(hidden).

    pred, target: (B, L, P)
    hidden: (B, L), each patch's weight: the binary mask (1 = hidden) gives MAE's loss over hidden patches,
        1 - m gives L_rec_soft.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    hidden = hidden.float()
    return (per_patch * hidden).sum() / hidden.sum()


def gauss_loss(m: Tensor, sigma: float) -> Tensor:
    """Mean of sigma*sqrt(2 pi)*exp(-(m - 0.5)^2 / (2 sigma^2)): peaks at m = 0.5, pushes m towards 0 or 1."""
    m = m.float()
    return (sigma * math.sqrt(2 * math.pi) * torch.exp(-((m - 0.5) ** 2) / (2 * sigma**2))).mean()


def kl_loss(m: Tensor, target_keep: float, reduction: str = "sum") -> Tensor:
    """KL(Bernoulli(mbar) || Bernoulli(target_keep)) per image, mbar = the image's mean m; summed or averaged.

    m: (B, L). `reduction="sum"` (the reference) makes the term, and so w_kl, scale with the per-rank batch.
    """
    mbar = m.float().mean(dim=1).clamp(_KL_EPS, 1 - _KL_EPS)
    kl = mbar * (mbar.log() - math.log(target_keep)) + (1 - mbar) * (torch.log1p(-mbar) - math.log1p(-target_keep))
    return kl.sum() if reduction == "sum" else kl.mean()


def diversity_loss(m: Tensor, scale: float) -> Tensor:
    """Mean over image pairs a < b of exp(-scale * ||m_a - m_b||_2); 0 for a single image.

    m: (B, L). High when images get similar masks; pdist computes just the B(B-1)/2 pairs, in one kernel.
    """
    if m.shape[0] < 2:
        return torch.zeros((), device=m.device)
    return torch.exp(-scale * torch.pdist(m.float())).mean()


def kl_target(cfg: LossConfig, mask_ratio: float) -> float:
    """The visible fraction L_KL holds each image to: 1 - r, or the reference's hard-coded 0.25."""
    return 1 - mask_ratio if cfg.kl_target == "mask_ratio" else REFERENCE_KL_TARGET


def cmm_loss(
    rec_soft: Tensor, m: Tensor, curriculum_factor: float, cfg: LossConfig, mask_ratio: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_CMM = lambda * L_rec_soft + w_gauss * L_gauss + w_kl * L_KL + w_div * L_div (SPEC section 4).

    rec_soft: L_rec_soft of the soft path; m: (B, L); curriculum_factor: lambda (+1 partner, -1 adversary).
    Returns the total and each unweighted term (every term is computed, so a zero weight still logs it).
    """
    terms = {
        "loss_rec_soft": rec_soft,
        "loss_gauss": gauss_loss(m, cfg.gauss_sigma),
        "loss_kl": kl_loss(m, kl_target(cfg, mask_ratio), cfg.kl_reduction),
        "loss_div": diversity_loss(m, cfg.div_scale),
    }
    total = (
        curriculum_factor * terms["loss_rec_soft"]
        + cfg.w_gauss * terms["loss_gauss"]
        + cfg.w_kl * terms["loss_kl"]
        + cfg.w_div * terms["loss_div"]
    )
    return total, terms


def kl_weight_warning(cfg: LossConfig, batch_per_rank: int) -> str | None:
    """Why L_KL weighs more or less than its recipe intends, or None.

    Summed over the rank's images (the reference's rule), L_KL grows with the per-rank batch while the other
    terms are means: w_kl set for `kl_reference_batch` images means batch / reference times that weight at
    another batch (fewer GPUs with accumulation, less memory). Each micro-batch is summed on its own, so the
    batch that counts is the images of one micro-batch that the CMM step uses: data.batch_size, times
    masking.cmm_batch_fraction, whatever train.accum_steps.
    """
    reference = cfg.kl_reference_batch
    if cfg.kl_reduction != "sum" or reference is None or batch_per_rank == reference or cfg.w_kl == 0:
        return None
    keep = cfg.w_kl * reference / batch_per_rank
    return (
        f"loss.kl_reduction=sum: L_KL is summed over the {batch_per_rank} images of each rank's micro-batch "
        f"(data.batch_size x masking.cmm_batch_fraction), but loss.w_kl={cfg.w_kl:g} is declared for {reference} "
        "(loss.kl_reference_batch), "
        f"so L_KL weighs {batch_per_rank / reference:.3g}x what the recipe intends. To keep its weight, set "
        f"loss.w_kl={keep:.4g} loss.kl_reference_batch={batch_per_rank} "
        f"(or loss.kl_reduction=mean loss.w_kl={cfg.w_kl * reference:.4g})."
    )

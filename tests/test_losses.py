"""Each loss against a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from clmae.config import load_config
from clmae.losses import (
    cmm_loss,
    diversity_loss,
    gauss_loss,
    kl_loss,
    kl_target,
    kl_weight_warning,
    reconstruction_loss,
    reconstruction_target,
)


def test_reconstruction_loss_averages_hidden_patches_only():
    target = torch.zeros(1, 3, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])  # per-patch MSE: 1, 2, 25
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the visible patch (error 25) does not count
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(1.5)


def test_soft_reconstruction_equals_hard_loss_for_binary_masks():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 16, 12), torch.randn(4, 16, 12)
    mask = (torch.rand(4, 16) < 0.75).float()
    keep = 1 - mask  # binary m: visible patches have m = 1
    hard = reconstruction_loss(pred, target, mask)
    soft = reconstruction_loss(pred, target, 1 - keep)
    errors = ((pred - target) ** 2).mean(-1)
    assert hard.item() == pytest.approx(errors[mask == 1].mean().item(), rel=1e-6)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)


def test_soft_reconstruction_weights_by_one_minus_m():
    pred = torch.tensor([[[1.0], [3.0]]])
    target = torch.zeros(1, 2, 1)
    keep = torch.tensor([[0.75, 0.5]])  # weights 0.25 and 0.5 on errors 1 and 9
    assert reconstruction_loss(pred, target, 1 - keep).item() == pytest.approx((0.25 * 1 + 0.5 * 9) / 0.75)


def test_norm_pix_target_normalises_each_patch():
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    target = reconstruction_target(patches, norm_pix=True)
    var = torch.tensor([1.0, 2.0, 3.0, 4.0]).var().item()  # unbiased, as MAE
    expected = [(v - 2.5) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 4.0)]
    assert target.flatten().tolist() == pytest.approx(expected)
    assert reconstruction_target(patches, norm_pix=False) is patches


def test_gauss_loss_peaks_at_one_half():
    peak = gauss_loss(torch.full((2, 8), 0.5), sigma=0.12)
    assert peak.item() == pytest.approx(0.12 * math.sqrt(2 * math.pi))
    assert round(peak.item(), 3) == 0.301
    binary = gauss_loss(torch.tensor([[0.0, 1.0]]), sigma=0.12)
    assert binary.item() == pytest.approx(0.12 * math.sqrt(2 * math.pi) * math.exp(-0.25 / (2 * 0.12**2)))
    assert binary.item() < 1e-4
    mixed = gauss_loss(torch.tensor([[0.5, 0.62]]), sigma=0.12)
    assert mixed.item() == pytest.approx(0.3008 * (1 + math.exp(-0.5)) / 2, rel=1e-3)


def test_kl_is_zero_when_each_image_keeps_one_minus_r():
    keep = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.1, 0.4, 0.2, 0.3]])
    assert kl_loss(keep, target_keep=1 - 0.75).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_hand_value_sum_and_mean():
    keep = torch.full((2, 4), 0.5)
    per_image = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_loss(keep, 0.25, "sum").item() == pytest.approx(2 * per_image)
    assert kl_loss(keep, 0.25, "mean").item() == pytest.approx(per_image)


def test_kl_target_follows_mask_ratio_or_reference():
    cfg = load_config(None)
    assert kl_target(cfg.loss, 0.6) == pytest.approx(0.4)
    reference = load_config(None, ["loss.kl_target=reference"])
    assert kl_target(reference.loss, 0.6) == 0.25
    keep = torch.full((3, 10), 0.4)
    assert kl_loss(keep, kl_target(cfg.loss, 0.6)).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(keep, kl_target(reference.loss, 0.6)).item() > 0.05


def test_kl_stays_finite_on_saturated_masks():
    keep = torch.ones(2, 8, requires_grad=True)
    loss = kl_loss(keep, 0.25)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(keep.grad))


def test_diversity_identical_masks_is_one_and_complementary_is_exp_sqrt_l():
    L = 16
    identical = torch.rand(1, L).expand(4, -1)
    assert diversity_loss(identical, scale=0.1).item() == pytest.approx(1.0)
    half = (torch.arange(L) % 2).float()
    complementary = torch.stack([half, 1 - half])
    assert diversity_loss(complementary, scale=0.1).item() == pytest.approx(math.exp(-0.1 * math.sqrt(L)))


def test_diversity_matches_the_pairwise_definition():
    torch.manual_seed(0)
    keep = torch.rand(5, 12)
    pairs = [(a, b) for a in range(5) for b in range(a + 1, 5)]
    expected = sum(math.exp(-0.1 * torch.linalg.norm(keep[a] - keep[b]).item()) for a, b in pairs) / len(pairs)
    assert diversity_loss(keep, scale=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_diversity_single_image_is_zero_and_collapse_has_finite_gradient():
    assert diversity_loss(torch.rand(1, 12), scale=0.1).item() == 0.0
    collapsed = torch.full((3, 12), 0.3, requires_grad=True)
    diversity_loss(collapsed, scale=0.1).backward()
    assert torch.all(torch.isfinite(collapsed.grad))


def test_losses_are_fp32_for_half_inputs():
    keep = torch.rand(3, 8).to(torch.bfloat16)
    pred = torch.randn(3, 8, 4).to(torch.bfloat16)
    assert reconstruction_loss(pred, torch.randn(3, 8, 4), 1 - keep).dtype == torch.float32
    for value in (gauss_loss(keep, 0.12), kl_loss(keep, 0.25), diversity_loss(keep, 0.1)):
        assert value.dtype == torch.float32


def test_cmm_loss_combines_weighted_terms():
    cfg = load_config(None)
    torch.manual_seed(0)
    keep = torch.rand(4, 16)
    rec_soft = torch.tensor(0.8)
    total, terms = cmm_loss(rec_soft, keep, -0.5, cfg.loss, mask_ratio=0.75)
    expected = (
        -0.5 * 0.8
        + 1.0 * gauss_loss(keep, 0.12).item()
        + 0.1 * kl_loss(keep, 0.25, "sum").item()
        + 2.0 * diversity_loss(keep, 0.1).item()
    )
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(terms) == {"loss_rec_soft", "loss_gauss", "loss_kl", "loss_div"}
    assert terms["loss_kl"].item() == pytest.approx(kl_loss(keep, 0.25).item())


def test_cmm_loss_weights_can_be_zero():
    cfg = load_config(None, ["loss.w_gauss=0", "loss.w_kl=0", "loss.w_div=0"])
    keep = torch.ones(2, 16)  # saturated: the KL term is large but must not leak in
    total, terms = cmm_loss(torch.tensor(0.8), keep, 1.0, cfg.loss, mask_ratio=0.75)
    assert total.item() == pytest.approx(0.8)
    assert terms["loss_kl"].item() > 1.0


def test_kl_weight_warning_names_both_batches_and_the_setting_that_keeps_the_weight():
    cfg = load_config("tiny_digits", ["loss.kl_reference_batch=256", "loss.w_kl=0.1"]).loss
    assert kl_weight_warning(cfg, 256) is None
    message = kl_weight_warning(cfg, 64)
    assert "64 images" in message and "declared for 256" in message and "0.25x" in message
    assert "loss.w_kl=0.4 loss.kl_reference_batch=64" in message
    assert "loss.kl_reduction=mean loss.w_kl=25.6" in message
    # Following the advice silences it, and so does a batch-independent reduction or no declared batch.
    fixed = load_config("tiny_digits", ["loss.w_kl=0.4", "loss.kl_reference_batch=64"]).loss
    assert kl_weight_warning(fixed, 64) is None
    assert kl_weight_warning(load_config("tiny_digits", ["loss.kl_reduction=mean"]).loss, 64) is None
    assert kl_weight_warning(load_config("tiny_digits", ["loss.kl_reference_batch=null"]).loss, 64) is None

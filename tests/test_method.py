"""The two steps of a CL-MAE iteration: where gradients go, and what they report."""

from __future__ import annotations

import math

import pytest
import torch

from clmae.config import load_config
from clmae.losses import gauss_loss
from clmae.masking import build_models, iteration_flops
from clmae.method import cmm_step, frozen, mae_step, mask_statistics


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = load_config("tiny_digits")
    mae, cmm = build_models(cfg)
    return cfg, mae, cmm, torch.randn(4, 3, 32, 32)


def test_mae_step_gives_no_gradient_to_the_cmm(setup):
    cfg, mae, cmm, imgs = setup
    loss, metrics = mae_step(mae, cmm, imgs, cfg)
    loss.backward()
    assert all(p.grad is None for p in cmm.parameters())
    trainable = [p for p in mae.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum().item() for p in trainable) > 0
    assert set(metrics) == {"loss_rec"}
    assert metrics["loss_rec"].item() == pytest.approx(loss.item())
    assert not metrics["loss_rec"].requires_grad


def test_cmm_step_trains_the_cmm_only(setup):
    cfg, mae, cmm, imgs = setup
    flags = {name: p.requires_grad for name, p in mae.named_parameters()}
    loss, _ = cmm_step(mae, cmm, imgs, 1.0, cfg)
    loss.backward()
    for name, param in cmm.named_parameters():
        assert param.grad is not None and param.grad.abs().sum().item() > 0, name
    assert all(p.grad is None for p in mae.parameters())
    assert flags == {name: p.requires_grad for name, p in mae.named_parameters()}


def test_cmm_step_with_a_caller_frozen_mae(setup):
    cfg, mae, cmm, imgs = setup
    with frozen(mae):
        loss, _ = cmm_step(mae, cmm, imgs, -1.0, cfg)
        assert not any(p.requires_grad for p in mae.parameters())
    loss.backward()
    assert all(p.grad is None for p in mae.parameters())
    assert mae.cls_token.requires_grad and not mae.pos_embed.requires_grad


def test_curriculum_factor_flips_the_reconstruction_gradient(setup):
    cfg, mae, cmm, imgs = setup
    no_regularisers = load_config("tiny_digits", ["loss.w_gauss=0", "loss.w_kl=0", "loss.w_div=0"])
    grads = []
    for lam in (1.0, -1.0):
        cmm.zero_grad(set_to_none=True)
        cmm_step(mae, cmm, imgs, lam, no_regularisers)[0].backward()
        grads.append(cmm.head.weight.grad.clone())
    torch.testing.assert_close(grads[0], -grads[1])
    assert cfg.loss.w_div == 2.0


def test_cmm_step_metrics(setup):
    cfg, mae, cmm, imgs = setup
    loss, metrics = cmm_step(mae, cmm, imgs, 0.37, cfg)
    assert set(metrics) == {
        "loss_cmm", "loss_rec_soft", "loss_gauss", "loss_kl", "loss_div", "lambda",
        "mask_mean", "mask_std", "mask_above_half", "mask_entropy",
    }  # fmt: skip
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad
    assert metrics["lambda"].item() == pytest.approx(0.37)
    assert metrics["loss_cmm"].item() == pytest.approx(loss.item())
    expected = (
        0.37 * metrics["loss_rec_soft"]
        + cfg.loss.w_gauss * metrics["loss_gauss"]
        + cfg.loss.w_kl * metrics["loss_kl"]
        + cfg.loss.w_div * metrics["loss_div"]
    )
    assert expected.item() == pytest.approx(loss.item(), rel=1e-5)
    with torch.no_grad():
        keep = cmm(mae.embed_patches(imgs))
    assert metrics["mask_mean"].item() == pytest.approx(keep.mean().item(), rel=1e-5)
    assert metrics["loss_gauss"].item() == pytest.approx(gauss_loss(keep, 0.12).item(), rel=1e-5)


def test_mask_statistics_hand_values():
    keep = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    stats = mask_statistics(keep)
    assert stats["mask_mean"].item() == pytest.approx(0.5)
    assert stats["mask_std"].item() == pytest.approx(math.sqrt(1 / 6))
    assert stats["mask_above_half"].item() == pytest.approx(0.25)
    assert stats["mask_entropy"].item() == pytest.approx(0.5)  # two undecided (1 bit), two binary (0 bits)


def test_random_mode_runs_the_mae_step_alone():
    torch.manual_seed(0)
    cfg = load_config("tiny_digits", ["masking.mode=random", "model.norm_pix_loss=true"])
    mae, cmm = build_models(cfg)
    assert cmm is None
    loss, metrics = mae_step(mae, cmm, torch.randn(2, 3, 32, 32), cfg)
    loss.backward()
    assert metrics["loss_rec"].item() == pytest.approx(loss.item())
    assert torch.isfinite(loss) and mae.blocks[0].attn.qkv.weight.grad is not None


def test_a_few_alternating_iterations_learn(setup):
    cfg, mae, cmm, imgs = setup
    mae_opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    cmm_opt = torch.optim.AdamW(cmm.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _ = mae_step(mae, cmm, imgs, cfg)
        loss.backward()
        mae_opt.step()
        mae_opt.zero_grad(set_to_none=True)
        cmm_loss, metrics = cmm_step(mae, cmm, imgs, 1.0, cfg)
        cmm_loss.backward()
        cmm_opt.step()
        cmm_opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        assert all(torch.isfinite(value) for value in metrics.values())
    assert losses[-1] < 0.5 * losses[0]


def test_iteration_flops_match_spec_estimates():
    # SPEC section 7: per image, plain MAE about 59 GFLOP (ViT-B) / 291 (ViT-H); CL-MAE 209 / 1198.
    for name, mae_only, clmae in (("vit_base_patch16", 59e9, 209e9), ("vit_huge_patch14", 291e9, 1198e9)):
        plain = iteration_flops(load_config(None, [f"model.name={name}", "masking.mode=random"]))
        assert plain["cmm"] == 0 and plain["mae"] == pytest.approx(mae_only, rel=0.02)
        both = iteration_flops(load_config(None, [f"model.name={name}"]))
        assert sum(both.values()) == pytest.approx(clmae, rel=0.02)
        # The MAE step of CL-MAE also runs the CMM forward (no grad) to choose its masks.
        assert both["mae"] > plain["mae"]

"""The MAE and the curriculum masking module: sizes, timm compatibility, masking paths."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import timm
import torch

from clmae.config import load_config
from clmae.masking import build_models
from clmae.models import (
    CurriculumMaskingModule,
    build_mae,
    sincos_pos_embed_2d,
    topk_masking,
)
from clmae.specs import timm_encoder_kwargs

# SPEC section 2 (CMM) and the official MAE pre-training models (encoder + 512-wide, 8-block decoder, fixed
# position embeddings counted, as `sum(p.numel() for p in model.parameters())` does in facebookresearch/mae).
EXPECTED_PARAMS = {
    "vit_base_patch16": {"mae": 111.9e6, "cmm": 35.6e6},
    "vit_large_patch16": {"mae": 329.5e6, "cmm": 63.2e6},
    "vit_huge_patch14": {"mae": 657.1e6, "cmm": 98.7e6},
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def meta_models(name: str):
    """MAE, CMM and the matching headless timm ViT, on the meta device (shapes only: instant, no memory)."""
    with torch.device("meta"):
        mae = build_mae(name)
        cmm = CurriculumMaskingModule(mae.num_patches, mae.embed_dim)
        reference = timm.create_model(**timm_encoder_kwargs(name))
    return mae, cmm, reference


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_counts_match_spec(name):
    mae, cmm, reference = meta_models(name)
    assert count(mae) == pytest.approx(EXPECTED_PARAMS[name]["mae"], rel=0.01)
    assert count(cmm) == pytest.approx(EXPECTED_PARAMS[name]["cmm"], rel=0.01)
    # The encoder is exactly timm's ViT without head; the rest is MAE's decoder.
    assert sum(v.numel() for v in mae.encoder_state_dict().values()) == count(reference)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_encoder_keys_and_shapes_load_strict_into_timm(name):
    mae, _, reference = meta_models(name)
    ours = {key: tuple(value.shape) for key, value in mae.encoder_state_dict().items()}
    assert ours == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    reference.load_state_dict(mae.encoder_state_dict(), strict=True, assign=True)


def test_vit_base_encoder_exports_to_timm_with_identical_features():
    torch.manual_seed(0)
    mae = build_mae("vit_base_patch16").eval()
    with torch.device("meta"):  # timm's own init would be overwritten: skip it
        reference = timm.create_model(**timm_encoder_kwargs("vit_base_patch16")).eval()
    reference.load_state_dict(mae.encoder_state_dict(), strict=True, assign=True)
    imgs = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = mae.forward_encoder(mae.embed_patches(imgs))
        theirs = reference.forward_features(imgs)
        pooled = reference.forward_head(theirs)
    assert ours.shape == theirs.shape == (1, 197, 768)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[:, 0], pooled, rtol=1e-4, atol=1e-4)


def test_tiny_encoder_loads_into_timm():
    mae = build_mae("vit_tiny")
    reference = timm.create_model(**timm_encoder_kwargs("vit_tiny"))
    reference.load_state_dict(mae.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mae.forward_encoder(mae.embed_patches(imgs)), reference.forward_features(imgs))


def mae_reference_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, written out: the layout our checkpoints must share."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_position_embedding_has_mae_layout_and_zero_cls_row():
    ours = sincos_pos_embed_2d(32, 5)
    assert ours.shape == (26, 32)
    assert torch.all(ours[0] == 0)
    np.testing.assert_allclose(ours.numpy(), mae_reference_sincos(32, 5), atol=1e-6)


def test_mae_init_fixed_position_embeddings_and_tokens():
    torch.manual_seed(0)
    mae = build_mae("vit_tiny")
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    torch.testing.assert_close(mae.pos_embed[0], sincos_pos_embed_2d(128, 8))
    assert mae.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    proj = mae.patch_embed.proj.weight.flatten(1)
    bound = math.sqrt(6 / (proj.shape[0] + proj.shape[1]))  # xavier-uniform of the patch embed as a linear
    assert proj.abs().max().item() <= bound
    assert proj.abs().max().item() > 0.9 * bound


def test_patchify_round_trip():
    mae = build_mae("vit_tiny")
    imgs = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 64, 48)
    # Patch 1 is the second 4x4 tile of the first row, flattened as (p, p, 3).
    torch.testing.assert_close(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())
    torch.testing.assert_close(mae.unpatchify(patches), imgs)


def test_topk_masking_keeps_exactly_the_k_largest():
    keep = torch.rand(5, 196)
    num_visible = int(196 * (1 - 0.75))
    ids_keep, ids_restore, mask = topk_masking(keep, num_visible)
    assert num_visible == 49
    assert torch.all((mask == 0).sum(dim=1) == 49)
    for scores, image_mask, kept in zip(keep, mask, ids_keep, strict=True):
        largest = set(torch.topk(scores, num_visible).indices.tolist())
        assert set(torch.nonzero(image_mask == 0).flatten().tolist()) == largest == set(kept.tolist())
        assert scores[image_mask == 0].min() > scores[image_mask == 1].max()
    # ids_restore undoes the [visible, hidden] ordering.
    shuffled = torch.argsort(keep, dim=1, descending=True)
    torch.testing.assert_close(torch.gather(shuffled, 1, ids_restore), torch.arange(196).expand(5, -1))


def test_hard_path_uses_the_cmm_top_k_without_a_graph():
    torch.manual_seed(0)
    mae, cmm = build_models(load_config("tiny_digits"))
    imgs = torch.randn(3, 3, 32, 32)
    pred, mask, keep = mae(imgs, cmm)
    assert pred.shape == (3, 64, 48)
    assert keep.grad_fn is None and not keep.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(keep, cmm(mae.embed_patches(imgs)))
    assert mae.num_visible == 16
    assert torch.all((mask == 0).sum(dim=1) == 16)
    for scores, image_mask in zip(keep, mask, strict=True):
        assert scores[image_mask == 0].min() > scores[image_mask == 1].max()


def test_soft_path_scales_every_token_and_keeps_them_all():
    torch.manual_seed(0)
    mae, cmm = build_models(load_config("tiny_digits"))
    imgs = torch.randn(2, 3, 32, 32)
    pred, hidden, keep = mae(imgs, cmm, soft=True)
    assert pred.shape == (2, 64, 48)
    torch.testing.assert_close(hidden, 1 - keep)
    assert keep.requires_grad
    # m = 1 everywhere is the unmasked MAE: the soft path then equals encoder + decoder on all tokens.
    ones = lambda tokens: torch.ones(tokens.shape[:2])
    pred_all, _, _ = mae(imgs, ones, soft=True)
    expected = mae.forward_decoder(mae.forward_encoder(mae.embed_patches(imgs)))
    torch.testing.assert_close(pred_all, expected)
    with pytest.raises(ValueError, match="soft path"):
        mae(imgs, None, soft=True)


def test_random_masking_mode_has_no_cmm_and_exact_ratio():
    torch.manual_seed(0)
    mae, cmm = build_models(load_config("tiny_digits", ["masking.mode=random", "model.mask_ratio=0.5"]))
    assert cmm is None
    _, mask, _ = mae(torch.randn(4, 3, 32, 32))
    assert torch.all(mask.sum(dim=1) == 32)
    assert len({tuple(row.tolist()) for row in mask}) == 4  # a fresh mask per image


def test_cmm_output_and_structure():
    torch.manual_seed(0)
    cmm = CurriculumMaskingModule(num_patches=64, embed_dim=128, depth=5, num_heads=4)
    m = cmm(torch.randn(3, 64, 128))
    assert m.shape == (3, 64)
    assert torch.all((m > 0) & (m < 1))
    assert len(cmm.blocks) == 5 and cmm.blocks[0].attn.num_heads == 4
    assert cmm.blocks[0].norm1.eps == 1e-5 and cmm.norm.eps == 1e-5
    # Its own CLS token, blocks and head only: the patch embedding is the MAE's.
    assert {name.split(".")[0] for name, _ in cmm.named_parameters()} == {"cls_token", "blocks", "norm", "head"}


def kept_counts(keep: torch.Tensor, num_visible: int, draws: int, break_ties: bool = True) -> torch.Tensor:
    """How often each position is kept over `draws` independent top-k choices of the same scores (L,)."""
    _, _, mask = topk_masking(keep.expand(draws, -1), num_visible, break_ties=break_ties)
    return (1 - mask).sum(dim=0)


def test_topk_breaks_ties_uniformly_chi_square():
    """All m equal (bf16's saturated sigmoid): every position must be kept equally often. Pearson's
    chi-square against uniform, L - 1 = 15 degrees of freedom, with a fixed seed; the 0.999 quantile is 37.7."""
    from scipy.stats import chi2

    length, num_visible, draws = 16, 4, 4000
    torch.manual_seed(0)
    counts = kept_counts(torch.ones(length), num_visible, draws)
    expected = draws * num_visible / length
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    assert statistic < chi2.ppf(0.999, length - 1), (statistic, counts.tolist())
    # A plain sort keeps the same positions every time: the bias the tie-break removes.
    biased = kept_counts(torch.ones(length), num_visible, draws, break_ties=False)
    assert ((biased - expected) ** 2 / expected).sum().item() > 100 * chi2.ppf(0.999, length - 1)


def test_topk_tie_break_changes_nothing_but_ties():
    torch.manual_seed(0)
    scores = torch.rand(8, 49)  # distinct: the same masks as a plain sort
    for break_ties in (True, False):
        _, _, mask = topk_masking(scores, 12, break_ties=break_ties)
        expected = torch.ones_like(scores).scatter_(1, scores.topk(12, dim=1).indices, 0.0)
        assert torch.equal(mask, expected)
    # Six positions tied at the top, four kept: always among the six, each about equally often.
    keep = torch.tensor([0.5, 1.0, 0.2, 1.0, 1.0, 0.9, 1.0, 1.0, 0.1, 1.0])
    counts = kept_counts(keep, 4, 3000)
    tied = keep == 1.0
    assert counts[~tied].sum() == 0
    assert (counts[tied] - 2000).abs().max() < 120, counts.tolist()  # binomial sd ~ 26


def test_cmm_head_is_fp32_in_a_bf16_module():
    """DeepSpeed's bf16 engine casts the whole module; m must still be fp32 and must not saturate where bf16's
    sigmoid would (a logit of 7: bf16 gives exactly 1.0)."""
    torch.manual_seed(0)
    cmm = CurriculumMaskingModule(num_patches=16, embed_dim=32, depth=1, num_heads=4)
    with torch.no_grad():
        cmm.head.weight.zero_()
        cmm.head.bias.fill_(7.0)
    cmm = cmm.bfloat16()
    tokens = torch.randn(3, 16, 32).bfloat16()
    m = cmm(tokens)
    assert m.dtype == torch.float32
    assert torch.sigmoid(torch.tensor(7.0).bfloat16()) == 1.0  # what a bf16 head would give
    torch.testing.assert_close(m, torch.full_like(m, torch.sigmoid(torch.tensor(7.0)).item()))
    m.sum().backward()  # gradients reach the bf16 parameters in their own dtype
    assert cmm.head.bias.grad.dtype == torch.bfloat16 and cmm.blocks[0].attn.qkv.weight.grad is not None


def test_vit_base_patch8_encoder_loads_strictly_into_timms_own_b8():
    """The reference's second model: our encoder is timm's vit_base_patch8_224 as timm names it (no size
    arguments needed), with the same features."""
    from clmae.weights import check_fits_timm

    torch.manual_seed(0)
    mae = build_mae("vit_base_patch8").eval()
    assert mae.num_patches == 784 and timm_encoder_kwargs("vit_base_patch8")["model_name"] == "vit_base_patch8_224"
    state = mae.encoder_state_dict()
    check_fits_timm(state, timm_encoder_kwargs("vit_base_patch8"), where="vit_base_patch8")
    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch8_224", num_classes=0).eval()
    reference.load_state_dict(state, strict=True, assign=True)
    imgs = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = mae.forward_encoder(mae.embed_patches(imgs))
        theirs = reference.forward_features(imgs)
    assert ours.shape == theirs.shape == (1, 785, 768)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

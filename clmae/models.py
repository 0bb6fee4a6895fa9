"""The MAE (ViT encoder + light decoder) and the curriculum masking module (CMM), from timm's ViT layers.

Shapes: B images, L patches per image, D encoder width, P = p*p*3 pixel values per patch, k = int(L * (1 - r))
visible patches at mask ratio r. Keep scores `m: (B, L)` in (0, 1), high = keep visible; binary masks follow
MAE: `mask: (B, L), 1 = hidden`.

The MAE's parameters are laid out as in facebookresearch/mae (`patch_embed`, `cls_token`, `pos_embed`, `blocks`,
`norm`, then `decoder_*` and `mask_token`), so its encoder keys are exactly those of timm's VisionTransformer:
`encoder_state_dict()` loads with `strict=True` into `timm.create_model(**timm_encoder_kwargs(name))`.

The CMM is a separate module (it gets its own optimiser and DeepSpeed engine). It has no patch embedding of its
own: it reads the MAE's position-embedded patch tokens, which `MaskedAutoencoderViT.forward` hands it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from clmae.specs import VIT_SPECS, image_size
from clmae.specs import timm_encoder_kwargs as timm_encoder_kwargs  # where clmae-eval looks it up

# MAE and timm's ViT use 1e-6; the CMM follows the reference code, which builds it with nn.LayerNorm's 1e-5.
MAE_NORM = partial(nn.LayerNorm, eps=1e-6)
CMM_NORM = partial(nn.LayerNorm, eps=1e-5)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding with a zero CLS row: (1 + grid_size**2, embed_dim).

    The layout is that of facebookresearch/mae's `get_2d_sincos_pos_embed` (first half encodes the column, second
    half the row; sines then cosines in each half), so its checkpoints and ours agree.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([encode(col), encode(row)], dim=1)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), patches]).float()


def init_weights_mae_style(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias (as official JAX ViT and MAE), unit/zero LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def topk_masking(keep: Tensor, num_visible: int, break_ties: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the `num_visible` patches with the highest scores in each image (the mask ratio is exact).

    keep: (B, L) scores, high = keep visible
    break_ties: among equal scores every position is equally likely to be kept. A sort alone resolves ties
        by patch order, a positional bias the method does not have, and ties are common once a low-precision
        sigmoid saturates (bf16 rounds it to exactly 1.0 from a logit of about 6.2). So the scores are put in a
        uniformly random order first (the global RNG: seeded, resumed with the run) and sorted stably. Off for
        MAE's uniform noise, which has no ties, so that plain MAE draws exactly MAE's masks.
    Returns ids_keep (B, k) indices of the visible patches, ids_restore (B, L) the permutation that puts the
    sequence [visible, hidden] back into patch order, and mask (B, L), 1 = hidden.
    """
    if break_ties:
        order = torch.argsort(torch.rand(keep.shape, device=keep.device), dim=1)
        ranked = torch.sort(torch.gather(keep, 1, order), dim=1, descending=True, stable=True).indices
        ids_shuffle = torch.gather(order, 1, ranked)
    else:
        ids_shuffle = torch.argsort(keep, dim=1, descending=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    mask = torch.ones(keep.shape, dtype=torch.float32, device=keep.device).scatter_(1, ids_keep, 0.0)
    return ids_keep, ids_restore, mask


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder; masking by uniform noise (plain MAE) or by a masking strategy's keep scores."""

    # Top-level names of the encoder's parameters: timm's VisionTransformer uses the same.
    ENCODER_KEYS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.num_visible = int(self.num_patches * (1 - mask_ratio))
        grid_size = self.patch_embed.grid_size[0]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Parameters (not buffers) as in MAE and timm, so the state dict keys match; fixed, hence no grad.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=MAE_NORM) for _ in range(depth)
        )
        self.norm = MAE_NORM(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, grid_size)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=MAE_NORM)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = MAE_NORM(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 3)

        self.apply(init_weights_mae_style)
        # The patch embedding is a linear map of each patch: initialise it as one, not as a conv.
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under timm VisionTransformer names (load into `timm_encoder_kwargs(name)`)."""
        return {key: value for key, value in self.state_dict().items() if key.split(".")[0] in self.ENCODER_KEYS}

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (B, 3, H, W) -> patches: (B, L, P), each patch flattened as (p, p, 3)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """patches: (B, L, P) -> imgs: (B, 3, H, W)."""
        p = self.patch_size
        b, num_patches, _ = patches.shape
        grid = math.isqrt(num_patches)
        x = patches.reshape(b, grid, grid, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, grid * p, grid * p)

    def embed_patches(self, imgs: Tensor) -> Tensor:
        """imgs: (B, 3, H, W), any float dtype -> patch tokens with position embedding, no CLS: (B, L, D), in the
        model's dtype (the loop hands over fp32 images so that the pixel targets stay fp32)."""
        return self.patch_embed(imgs.to(self.pos_embed.dtype)) + self.pos_embed[:, 1:]

    def forward_encoder(self, tokens: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """tokens: (B, L, D) from `embed_patches`; ids_keep: (B, k) visible patches, None = all.

        Returns the latent (B, 1 + k, D) (or (B, 1 + L, D)), CLS first, after the final norm.
        """
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor | None = None) -> Tensor:
        """latent: (B, 1 + k, D); ids_restore: (B, L) from `topk_masking`, None when nothing was dropped.

        Returns pred: (B, L, P), a reconstruction of every patch.
        """
        x = self.decoder_embed(latent)
        if ids_restore is not None:
            num_hidden = ids_restore.shape[1] + 1 - x.shape[1]
            patches = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], num_hidden, -1)], dim=1)
            patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self, imgs: Tensor, scorer: Callable[[Tensor], Tensor] | None = None, soft: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One MAE pass; everything runs inside this call so that wrappers hooking `forward` see all of it.

        imgs: (B, 3, H, W)
        scorer: maps the patch tokens (B, L, D) to keep scores m (B, L), high = keep visible: a masking strategy's
            (clmae/masking.py), e.g. the curriculum masking module; None = MAE's uniform random noise.
        soft: False = hard path: the k patches with the highest m are visible, the rest are dropped. m only
            selects indices, which carry no gradient, so the scorer runs without autograd here.
            True = soft path (needs a scorer): every token is scaled by its m and all L go through encoder and
            decoder, so the reconstruction is differentiable in m.
        Returns pred (B, L, P); hidden (B, L), each patch's weight in the loss: the binary mask (1 = hidden) on the
        hard path, 1 - m on the soft path; keep (B, L), the scores used (m, or the noise of random masking). A
        scorer's m is fp32 whatever the model's dtype (the CMM's head runs in fp32), and so is 1 - m.
        """
        tokens = self.embed_patches(imgs)
        if soft:
            if scorer is None:
                raise ValueError("the soft path needs a scorer, such as a curriculum masking module")
            keep = scorer(tokens)  # fp32 from the CMM's head; the token scaling runs in the model's dtype
            pred = self.forward_decoder(self.forward_encoder(tokens * keep.unsqueeze(-1).to(tokens.dtype)))
            return pred, 1 - keep, keep
        with torch.no_grad():
            keep = (scorer or uniform_keep_scores)(tokens)
        # Uniform noise has no ties: skipping the tie-break keeps plain MAE's masks exactly MAE's.
        ids_keep, ids_restore, mask = topk_masking(keep, self.num_visible, break_ties=scorer is not None)
        pred = self.forward_decoder(self.forward_encoder(tokens, ids_keep), ids_restore)
        return pred, mask, keep


def uniform_keep_scores(tokens: Tensor) -> Tensor:
    """MAE's random masking: uniform noise (B, L) as keep scores, so the top k are a uniform random subset."""
    return torch.rand(tokens.shape[:2], device=tokens.device)


class CurriculumMaskingModule(nn.Module):
    """Predicts a keep score per patch from the MAE's patch tokens (SPEC section 2).

    A transformer at the encoder's width over [own CLS, patch tokens]; the CLS output goes through
    LayerNorm -> Linear(D -> L) -> sigmoid. Position information comes with the MAE's tokens.
    """

    def __init__(self, num_patches: int, embed_dim: int, depth: int = 5, num_heads: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=CMM_NORM) for _ in range(depth)
        )
        self.norm = CMM_NORM(embed_dim)
        self.head = nn.Linear(embed_dim, num_patches)
        self.apply(init_weights_mae_style)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, L, D) position-embedded patch tokens -> m: (B, L) in (0, 1), high = keep visible.

        m is fp32 whatever the engine's dtype: the head (final norm, linear, sigmoid) runs in fp32 on fp32 copies
        of its weights, so m does not saturate at bf16's 1.0 (logit 6.2) and the CMM's loss terms see full
        precision (the reference's fp16 autocast runs the Linear and the sigmoid in fp16, which rounds m to 1.0
        from a logit of about 8.3).
        """
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        # Under a caller's autocast the linear would drop back to half precision; meta tensors (FLOP counting)
        # have no autocast at all.
        no_autocast = x.device.type in ("cpu", "cuda")
        with torch.autocast(x.device.type, enabled=False) if no_autocast else contextlib.nullcontext():
            cls = x[:, 0].float()
            norm, head = self.norm, self.head
            cls = F.layer_norm(cls, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
            return torch.sigmoid(F.linear(cls, head.weight.float(), head.bias.float()))


def compile_blocks(module: nn.Module) -> int:
    """torch.compile each transformer block of `module` in place (`nn.Module.compile`): regional compilation, so
    the compile time is about one block's per block shape, not the whole model's, and the module keeps its
    parameters and state-dict keys (no `_orig_mod.` wrapper), which checkpoints, exports and resumes rely on.
    Compiles on the first forward; returns the number of blocks."""
    blocks = [block for block in module.modules() if isinstance(block, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def build_mae(name: str, img_size: int | None = None, mask_ratio: float = 0.75) -> MaskedAutoencoderViT:
    spec = VIT_SPECS[name]
    return MaskedAutoencoderViT(
        img_size=image_size(name, img_size),
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        decoder_embed_dim=spec.decoder_embed_dim,
        decoder_depth=spec.decoder_depth,
        decoder_num_heads=spec.decoder_num_heads,
        mask_ratio=mask_ratio,
    )

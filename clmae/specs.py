"""What a model is, by name: its architecture, its image size and the pixel normalisation it expects.

No torch here: the config schema imports this module for the list of model names, and so do the
command-line tools before they load anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The ImageNet channel statistics MAE normalises with (pixel / 255 - mean) / std; the loaders, the
# fine-tuning augmentations and the mask pictures all use these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTSpec:
    """An MAE architecture: the encoder is timm's `timm_name` at these sizes, the decoder is MAE's."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


VIT_SPECS: dict[str, ViTSpec] = {
    # CPU-sized for tests and the demo: 8x8 patches of 4 px, 6 blocks of width 128 (head width 32, as the
    # decoders of B/L/H); the decoder keeps MAE's proportions (narrower and shallower than the encoder). With its
    # CMM, one CL-MAE iteration (both steps) on 64 images takes about 1.2 s on two CPU cores; ViT-Ti's width (192)
    # took twice that.
    "vit_tiny": ViTSpec(
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=6,
        num_heads=4,
        timm_name="vit_tiny_patch16_224",
        decoder_embed_dim=96,
        decoder_depth=2,
        decoder_num_heads=3,
    ),
    "vit_base_patch16": ViTSpec(224, 16, 768, 12, 12, timm_name="vit_base_patch16_224"),
    "vit_large_patch16": ViTSpec(224, 16, 1024, 24, 16, timm_name="vit_large_patch16_224"),
    "vit_huge_patch14": ViTSpec(224, 14, 1280, 32, 16, timm_name="vit_huge_patch14_224"),
}

MODEL_NAMES = tuple(VIT_SPECS)


def image_size(name: str, img_size: int | None = None) -> int:
    """The side in pixels a `name` model runs at: `img_size` (config key model.img_size) or its native one."""
    return img_size or VIT_SPECS[name].img_size


def model_image_size(model: Any) -> int:
    """`image_size` of a config's `model` section (anything with `.name` and `.img_size`)."""
    return image_size(model.name, model.img_size)


def timm_encoder_kwargs(name: str, img_size: int | None = None) -> dict:
    """Arguments of `timm.create_model` for the headless timm ViT that our `name` encoder's weights load into."""
    spec = VIT_SPECS[name]
    return {
        "model_name": spec.timm_name,
        "img_size": image_size(name, img_size),
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "num_classes": 0,
    }

"""A masking strategy that lives outside clmae, for tests/test_masking.py: `masking.mode` names it as
`tests.masking_plugins:CentreMasking`, with nothing registered in clmae."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clmae.masking import MaskingStrategy


class CentreMasking(MaskingStrategy):
    """The k patches nearest the image centre stay visible, in every image at every step; no module of its
    own. Its step trains nothing: it reports how many images its scorer masked since the last step, which
    proves the MAE step took its hard masks from here."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.images_scored = 0

    def scorer(self, module):
        return self.centre_scores

    def centre_scores(self, tokens: Tensor) -> Tensor:
        """tokens (B, L, D) -> keep scores (B, L): minus the squared distance to the grid centre, ties broken
        by patch index so that the top k is the same set everywhere."""
        batch, num_patches = tokens.shape[:2]
        grid = math.isqrt(num_patches)
        index = torch.arange(num_patches, device=tokens.device)
        rows, cols = index // grid - (grid - 1) / 2, index % grid - (grid - 1) / 2
        scores = -(rows**2 + cols**2) - index / (num_patches * 10)
        self.images_scored += batch
        return scores.expand(batch, -1)

    def step(self, engines, micro_batches, lam):
        scored, self.images_scored = self.images_scored, 0
        return {"centre/images_scored": torch.tensor(float(scored), device=micro_batches[0].device)}

    def report(self, report):
        return [f"centre masks on {report['centre/images_scored']:.0f} images"]

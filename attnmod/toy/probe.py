"""Caption probe: keeps every caption attribute readable in the toy text encoder's output.

Why it exists: trained by the diffusion loss alone, the toy's 2-layer CLIP text encoder let a large,
word-independent activation swamp the position words. At UNet step 11,600 the outputs for "… on the
left" and "… on the right" were 0.5 apart (L2 over the sequence) against 7.7 for "left" vs "top", so
the UNet learned the axis a prompt asks for but not its side, and put objects left or right by the
noise (position 52 % on held-out prompts). Real Stable Diffusion inherits a text encoder pre-trained
contrastively (CLIP), whose outputs keep words apart; this probe is the toy's cheap stand-in.

``CaptionProbe`` is a set of cosine classifiers with a fixed temperature, one per attribute (the
shape / colour / size / position of each object slot, background colour and pattern, style), reading
the flattened encoder output (B, L, D). A cosine classifier can only rotate its weights, so to
separate classes at temperature ``scale`` the encoder itself must put them apart. It is used in
training only (``TrainConfig.aux_weight``) and is not part of the shipped model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnmod.toy import dataset

IGNORE = -100
HEADS: dict[str, tuple[str, ...]] = {
    **{f"{a}{k}": v for k in (0, 1) for a, v in (("shape", dataset.SHAPES), ("color", tuple(dataset.COLORS)),
                                                  ("size", dataset.SIZES), ("position", dataset.POSITIONS))},
    "background": tuple(dataset.COLORS),
    "pattern": dataset.PATTERNS,
    "style": dataset.STYLES,
}
_CLAUSE = {"background": "background", "pattern": "background", "style": "style"}


def scene_labels(scene: dataset.Scene) -> list[int]:
    """Class index per head in ``HEADS`` order; ``IGNORE`` for a second object the scene lacks."""
    out = []
    for name, classes in HEADS.items():
        if name in _CLAUSE:
            value = getattr(scene, name)
        else:
            slot = int(name[-1])
            value = getattr(scene.objects[slot], name[:-1]) if slot < len(scene.objects) else None
        out.append(IGNORE if value is None else classes.index(value))
    return out


def labels_for_seeds(n: int) -> torch.Tensor:
    """(n, len(HEADS)) labels of the generator's scenes for seeds 0..n-1 (the latent cache's order)."""
    import numpy as np

    return torch.tensor([scene_labels(dataset.random_scene(np.random.default_rng(s))) for s in range(n)])


def mask_dropped(labels: torch.Tensor, keep_bg: torch.Tensor, keep_style: torch.Tensor,
                 keep_caption: torch.Tensor) -> torch.Tensor:
    """Labels (B, H) with the heads of clauses a caption variant left out set to ``IGNORE``."""
    labels = labels.clone()
    names = list(HEADS)
    for name, clause in _CLAUSE.items():
        keep = keep_bg if clause == "background" else keep_style
        labels[~keep, names.index(name)] = IGNORE
    labels[~keep_caption] = IGNORE
    return labels


class CaptionProbe(nn.Module):
    def __init__(self, tokens: int, dim: int, scale: float = 16.0, generator: torch.Generator | None = None):
        super().__init__()
        self.sizes = [len(c) for c in HEADS.values()]
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(sum(self.sizes), tokens * dim, generator=generator))

    def forward(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """emb (B, L, D) → one (B, classes) logit tensor per head."""
        cos = F.normalize(emb.flatten(1), dim=-1) @ F.normalize(self.weight, dim=-1).T  # (B, sum classes)
        return list((self.scale * cos).split(self.sizes, dim=-1))

    def loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the heads that have at least one label in the batch."""
        losses = [F.cross_entropy(logits, labels[:, i], ignore_index=IGNORE)
                  for i, logits in enumerate(self(emb)) if (labels[:, i] != IGNORE).any()]
        return torch.stack(losses).mean() if losses else emb.sum() * 0

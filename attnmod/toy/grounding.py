"""Token grounding for the toy model's training (TokenCompose-style, Wang et al. 2024): training only.

The generator knows where every object is, so cross-attention can be supervised directly: each
object's size, colour and shape tokens should send their attention to that object's pixels, and those
pixels should take much of their attention from them. TokenCompose's two terms, on the
cross-attention probabilities of the latent-resolution blocks, averaged over heads and blocks:
``token_loss`` = ``(1 - attention mass inside the mask / total mass)²`` (where the token attends) and
``pixel_loss`` = binary cross-entropy of the token's probability in each patch against the mask (how
much each patch takes from it).

Why: without them the toy model routes an object's content through the last words of its phrase ("at
the top" — a causal text encoder puts the whole phrase there): the shape token's own map is often
lowest on the object, so word maps and segment labels name the wrong word. With the token term alone
the maps land on the object but carry almost nothing (the colour word had 0.6 % of the object's
attention), so re-weighting a word in Prompt-to-Prompt changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from attnmod.toy import dataset

GROUNDED = (1, 2, 3)  # offsets of size, colour, shape in "a {size} {colour} {shape} ..." after a phrase start


def object_token_positions(ids: list[int], comma_id: int, n_objects: int) -> list[list[int]]:
    """Token positions of each object's size, colour and shape words in a caption's ids (BOS first)."""
    starts = [1] + [i + 1 for i, t in enumerate(ids) if t == comma_id]  # object phrases come first
    return [[starts[o] + k for k in GROUNDED] for o in range(n_objects)]


def grounding_targets(seeds: list[int], ids: torch.Tensor, keep: torch.Tensor, comma_id: int,
                      latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, token position, mask) of every grounded token; masks (K, h*w) at ``latent_hw``.

    seeds: the generator seeds of the batch's images; ids: (B, L); keep: (B,) False where the caption was
    dropped (nothing to ground).
    """
    rows, positions, masks = [], [], []
    for b, seed in enumerate(seeds):
        if not keep[b]:
            continue
        sample = dataset.sample(int(seed))
        m = torch.from_numpy(sample.masks.astype(np.float32))[:, None]  # (n, 1, 64, 64)
        m = F.adaptive_avg_pool2d(m, latent_hw)[:, 0].flatten(1)  # (n, h*w): share of each patch covered
        for o, toks in enumerate(object_token_positions(ids[b].tolist(), comma_id, len(sample.scene.objects))):
            for t in toks:
                rows.append(b)
                positions.append(t)
                masks.append(m[o])
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, latent_hw[0] * latent_hw[1])
    return torch.tensor(rows), torch.tensor(positions), torch.stack(masks)


def grounded_maps(probs: list[torch.Tensor], rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(K, h*w) each grounded token's attention probability per patch, averaged over heads and blocks.
    probs: per block (B, heads, h*w, L), all at the masks' resolution."""
    attn = torch.stack([p.mean(1) for p in probs]).mean(0)  # (B, h*w, L)
    return attn[rows, :, positions]


def token_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token term: where a token attends. maps, masks: (K, h*w)."""
    inside = (maps * masks.to(maps)).sum(1) / (maps.sum(1) + 1e-8)  # (K,)
    return ((1 - inside) ** 2).mean()


def pixel_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's pixel term: how much each patch takes from the token, binary cross-entropy of the
    token's attention probability against its mask. maps, masks: (K, h*w)."""
    return F.binary_cross_entropy(maps.clamp(1e-6, 1 - 1e-6), masks.to(maps))

"""Attention maps captured while generating (daam-style): aggregated on the fly, returned as an object.

    with attnmod.maps.trace(pipe) as tc:
        image = pipe(prompt).images[0]
    maps = tc.result()
    maps.word_map("circle"); maps.overlay(image, "circle"); maps.self_attention_pca()

Cross-attention maps say how much each prompt token passes to each latent patch; they are summed over
heads, steps and blocks after resizing to the latent resolution, keeping one (images, H, W, tokens)
tensor. Self-attention maps (patch -> patch) are summed at one resolution (``self_resolution``
patches per side, default the largest at most 32). ``keep=True`` also keeps every step's and every
block's cross-attention map, for ``AttentionMaps.select``. Only the blocks captured pay for explicit
probabilities (``attention.ExplicitAttnProcessor``); the others keep the fused kernel. With
classifier-free guidance only the conditional half is kept.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .attention import AttentionCall, explicit_attention, token_grid
from .blocks import resolve_blocks
from .steps import EXTRA_CALL, LoopClock
from .tokenizer import split_words, word_positions


@dataclass
class AttentionMaps:
    cross: torch.Tensor  # (images, H, W, tokens), summed
    self_maps: torch.Tensor | None  # (images, r*r, r*r), summed
    self_resolution: tuple[int, int] | None
    tokens: list[list[str]]  # per image, the tokenizer's pieces (position 0 = start token)
    kept: dict[tuple[int, str], torch.Tensor] | None = None  # (step, short block name) -> (images, H, W, tokens)

    def select(self, steps: Iterable[int] | None = None, blocks: str | Iterable[str] | None = None) -> AttentionMaps:
        """These maps with ``cross`` re-summed over the kept ``steps`` and ``blocks`` only (short names or
        globs, e.g. ``"U3*"``; ``None``: all kept). Needs ``trace(..., keep=True)``."""
        if not self.kept:
            raise ValueError("per-step/per-block maps were not kept: trace(..., keep=True)")
        patterns = [blocks] if isinstance(blocks, str) else None if blocks is None else list(blocks)
        step_set = None if steps is None else set(steps)
        chosen = [m for (step, block), m in self.kept.items()
                  if (step_set is None or step in step_set)
                  and (patterns is None or any(fnmatch.fnmatchcase(block, p.upper()) for p in patterns))]
        if not chosen:
            kept_steps = sorted({s for s, _ in self.kept})
            kept_blocks = sorted({b for _, b in self.kept})
            raise ValueError(f"no kept map matches steps={steps!r} blocks={blocks!r}; kept steps "
                             f"{kept_steps[0]}..{kept_steps[-1]}, blocks {', '.join(kept_blocks)}")
        return replace(self, cross=torch.stack(chosen).sum(0))

    def token_index(self, word: str, image: int = 0) -> list[int]:
        """Token positions of ``word`` (all its BPE pieces, every occurrence)."""
        hits = word_positions(self.tokens[image], word)
        if not hits:
            words = [w for w, _ in split_words(self.tokens[image])]
            raise ValueError(f"{word!r} is not in the prompt; its tokens are: {' '.join(words)}")
        return hits

    def word_map(self, word: str, image: int = 0) -> torch.Tensor:
        """(H, W) map of ``word``'s cross-attention, scaled to [0, 1]."""
        m = self.cross[image][..., self.token_index(word, image)].sum(-1)
        return (m - m.min()) / (m.max() - m.min() + 1e-8)

    def overlay(self, image: Image.Image, word: str, index: int = 0, alpha: float = 0.6) -> Image.Image:
        """``image`` with ``word``'s map laid over it as a red-yellow heat map."""
        m = self.word_map(word, index)[None, None]
        m = F.interpolate(m, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0].numpy()
        heat = np.stack([np.ones_like(m), m, np.zeros_like(m)], -1) * 255
        base = np.asarray(image.convert("RGB"), dtype=np.float32)
        out = base * (1 - alpha * m[..., None]) + heat * alpha * m[..., None]
        return Image.fromarray(out.clip(0, 255).astype(np.uint8))

    def self_attention_pca(self, image: int = 0) -> Image.Image:
        """First three principal components of the self-attention rows as RGB (r × r image)."""
        if self.self_maps is None:
            raise ValueError("no self-attention was captured (trace(..., self_attention=True))")
        rows = self.self_maps[image].float()  # (r*r, r*r): one row per patch
        rows = rows - rows.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(rows, q=3, center=False)
        comps = rows @ v[:, :3]  # (r*r, 3)
        comps = (comps - comps.min(0).values) / (comps.max(0).values - comps.min(0).values + 1e-8)
        h, w = self.self_resolution
        return Image.fromarray((comps.reshape(h, w, 3).numpy() * 255).astype(np.uint8))


class trace:  # noqa: N801 - a context manager used like daam's ``trace``
    """Capture attention maps of the next pipeline call(s) on ``blocks`` over steps ``[start, stop)``."""

    def __init__(self, pipe, blocks: str = "all", steps: tuple[int, int] | None = None,
                 self_attention: bool = True, self_resolution: int | None = None, keep: bool = False):
        self.pipe = pipe
        self.unet = pipe.unet
        self.steps = steps
        chosen = resolve_blocks(self.unet, blocks)
        self._latent_hw: tuple[int, int] | None = None
        self._clock = LoopClock(pipe)
        self.cross = None
        self.self_maps = None
        self.self_resolution = None
        self._self_res_side = self_resolution
        self._cross_names = [b.name for b in chosen if b.kind == "cross"]
        self._short = {b.name: b.short for b in chosen}
        self.kept: dict[tuple[int, str], torch.Tensor] | None = {} if keep else None
        self._self_names = [b.name for b in chosen if b.kind == "self"] if self_attention else []
        self._explicit = None
        self._handle = None

    # -- state ------------------------------------------------------------------------------------
    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self._clock.tick()
        self._latent_hw = tuple(sample.shape[-2:])

    def _active(self) -> bool:
        return self.steps is None or self.steps[0] <= self._clock.step < self.steps[1]

    def _conditional(self, probs: torch.Tensor) -> torch.Tensor:
        if getattr(self.pipe, "do_classifier_free_guidance", False):
            return probs[probs.shape[0] // 2 :]
        return probs

    def _grid(self, tokens: int) -> tuple[int, int]:
        return token_grid(self._latent_hw, tokens)

    def _wants(self, call: AttentionCall) -> bool:
        """Probabilities are built only for calls that are kept: active steps, and self-attention only
        at the chosen resolution (other layers run the fused kernel). A UNet call made inside a step (an fp16
        overflow redone in fp32, a strategy's candidates) adds nothing: the step's maps are its loop call's."""
        if not self._active() or (not torch.compiler.is_compiling() and EXTRA_CALL.get()):
            return False
        if call.is_cross:
            return True
        side = self._self_res_side or self._default_self_side()
        return self._grid(call.query_shape[1]) == self._grid_for_side(side)

    def _on_cross(self, call: AttentionCall, probs: torch.Tensor) -> None:
        p = self._conditional(probs).sum(1).float()  # (b, Nq, Nk): summed over heads
        h, w = self._grid(p.shape[1])
        p = p.transpose(1, 2).reshape(p.shape[0], -1, h, w)  # (b, Nk, h, w)
        p = F.interpolate(p, size=self._latent_hw, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        p = p.cpu()  # (b, H, W, Nk)
        self.cross = p if self.cross is None else self.cross + p
        if self.kept is not None:
            key = (self._clock.step, self._short[call.name])
            self.kept[key] = p if key not in self.kept else self.kept[key] + p  # a second pipeline call adds up
        return None

    def _on_self(self, call: AttentionCall, probs: torch.Tensor) -> None:
        n = probs.shape[-1]
        p = self._conditional(probs).sum(1).float().cpu()  # (b, N, N)
        self.self_maps = p if self.self_maps is None else self.self_maps + p
        self.self_resolution = self._grid(n)
        return None

    def _grid_for_side(self, side: int) -> tuple[int, int]:
        H, W = self._latent_hw
        f = max(H, W) / side
        return round(H / f), round(W / f)

    def _default_self_side(self) -> int:
        side = max(self._latent_hw)
        while side > 32:
            side //= 2
        return side

    # -- install / restore ---------------------------------------------------------------------------
    def __enter__(self) -> trace:
        hooks = {n: self._on_cross for n in self._cross_names} | {n: self._on_self for n in self._self_names}
        self._handle = self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        self._explicit = explicit_attention(self.unet, hooks, wants=self._wants).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._explicit is not None:
            self._explicit.__exit__(*exc)
            self._explicit = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def result(self, prompts: list[str] | str | None = None) -> AttentionMaps:
        """The aggregated maps; ``prompts`` (default: none) names the tokens for ``word_map``."""
        if self.cross is None:
            raise ValueError("nothing was captured: run the pipeline inside the trace (and check the step range)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        tok = self.pipe.tokenizer
        tokens = [tok.convert_ids_to_tokens(tok(p, padding="max_length", truncation=True,
                                                max_length=tok.model_max_length).input_ids) for p in prompts]
        return AttentionMaps(self.cross, self.self_maps, self.self_resolution, tokens, self.kept)

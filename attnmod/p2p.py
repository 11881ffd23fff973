"""Prompt-to-Prompt (Hertz et al. 2022): edit an image by editing its prompt, keeping its layout.

Source and edited prompt are generated together in one batch from the same noise. In the edited
image's attention, for the first ``cross_replace_steps`` fraction of steps the cross-attention maps
are the source's (word swap: all tokens; refinement: tokens aligned with the source, added words keep
their own), and for the first ``self_replace_steps`` fraction the self-attention maps are the source's
(at up to ``self_max_patches`` patches, as in the reference). Re-weighting scales chosen words'
cross-attention in the edited image. A local blend keeps the source's latents outside the region where
the blend words attend (their normalised maps above ``blend_threshold``), after every step. Per-word overrides of ``cross_replace_steps`` use the field's
``{"default_": 0.8, "cat": 0.4}`` form. Only the conditional half of the CFG batch is edited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import AttentionCall, explicit_attention, token_grid
from .blocks import list_blocks
from .generate import finite
from .steps import LoopClock
from .tokenizer import split_words, word_positions


@dataclass(frozen=True)
class EditOptions:
    cross_replace_steps: float | dict[str, float] = 0.8
    self_replace_steps: float = 0.4
    reweight: dict[str, float] = field(default_factory=dict)  # word -> factor for its cross-attention
    self_max_patches: int = 32 * 32
    local_blend: tuple[str, ...] = ()  # words whose region may change; elsewhere the source is kept
    blend_threshold: float = 0.3  # of the blend words' normalised attention

    def __post_init__(self):
        fractions = self.cross_replace_steps.values() if isinstance(self.cross_replace_steps, dict) else [
            self.cross_replace_steps]
        for f in [*fractions, self.self_replace_steps]:
            if not 0 <= f <= 1:
                raise ValueError(f"replace steps are fractions in [0, 1], got {f}")


def _words(tokenizer, prompt: str) -> list[str]:
    return [t.removesuffix("</w>") for t in tokenizer.tokenize(prompt)]


def token_mapping(tokenizer, source: str, target: str, mode: str) -> list[int | None]:
    """For each token position of ``target`` (with start token at 0), the source position it copies, or None.

    ``swap`` requires equal token counts (position i <- i); ``refine`` aligns the longest common
    subsequence of words, so added words map to None.
    """
    src, tgt = _words(tokenizer, source), _words(tokenizer, target)
    n = tokenizer.model_max_length
    if mode == "swap":
        if len(src) != len(tgt):
            raise ValueError(f"a word swap needs prompts of the same token length ({len(src)} vs {len(tgt)}: "
                             f"{' '.join(src)!r} -> {' '.join(tgt)!r}); to add words use refinement (--refine)")
        return list(range(n))
    # LCS alignment (dynamic programming over words)
    table = np.zeros((len(src) + 1, len(tgt) + 1), dtype=int)
    for i in range(len(src) - 1, -1, -1):
        for j in range(len(tgt) - 1, -1, -1):
            table[i, j] = table[i + 1, j + 1] + 1 if src[i] == tgt[j] else max(table[i + 1, j], table[i, j + 1])
    mapping: list[int | None] = [0] + [None] * len(tgt)
    i = j = 0
    while i < len(src) and j < len(tgt):
        if src[i] == tgt[j]:
            mapping[j + 1] = i + 1
            i, j = i + 1, j + 1
        elif table[i + 1, j] >= table[i, j + 1]:
            i += 1
        else:
            j += 1
    tail = list(range(len(src) + 1, n))  # end and padding tokens align in order
    return (mapping + tail + [None] * n)[:n]


class PromptToPrompt:
    """The probs hook: replaces and re-weights the edited image's attention (batch = [source, edit])."""

    def __init__(self, pipe, source: str, target: str, options: EditOptions, mode: str):
        tok = pipe.tokenizer
        self.clock = LoopClock(pipe)
        self.pipe = pipe
        self.options = options
        mapping = token_mapping(tok, source, target, mode)
        self.index = torch.tensor([m if m is not None else i for i, m in enumerate(mapping)])
        self.aligned = torch.tensor([m is not None for m in mapping])
        n = tok.model_max_length
        # the edited prompt's tokens by position (BPE pieces: a word may span several)
        self.pieces = ([tok.bos_token] + tok.tokenize(target) + [tok.eos_token] * n)[:n]
        source_pieces = [tok.bos_token] + tok.tokenize(source)

        def target_words() -> str:
            return " ".join(w for w, _ in split_words(self.pieces))

        self.weights = torch.ones(n)
        for word, factor in options.reweight.items():
            hits = word_positions(self.pieces, word)
            if not hits:
                raise ValueError(f"cannot re-weight {word!r}: not in the edited prompt (its words are: {target_words()})")
            self.weights[hits] = factor
        if isinstance(options.cross_replace_steps, dict):
            for word in options.cross_replace_steps:
                if word != "default_" and not word_positions(self.pieces, word):
                    raise ValueError(f"cross_replace_steps names {word!r}, which is not in the edited prompt "
                                     f"(its words are: {target_words()})")
        self.num_steps = 0
        self.blend_tokens = []  # (image 0 = source, image 1 = edit) token indices of the blend words
        for word in options.local_blend:
            in_src, in_tgt = word_positions(source_pieces, word), word_positions(self.pieces, word)
            if not in_src and not in_tgt:
                raise ValueError(f"local blend word {word!r} is in neither prompt")
            self.blend_tokens.append((in_src, in_tgt))
        self.blend_map = None  # (2, H, W) this step's attention to the blend words

    def cross_limit(self) -> torch.Tensor:
        """Per target token: the fraction of steps during which its map is the source's."""
        f = self.options.cross_replace_steps
        if not isinstance(f, dict):
            return torch.full((len(self.pieces),), float(f))
        out = torch.full((len(self.pieces),), float(f.get("default_", 0.8)))
        for word, frac in f.items():
            if word != "default_":
                out[word_positions(self.pieces, word)] = float(frac)
        return out

    def on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        if self.clock.tick():
            timesteps = self.pipe.scheduler.timesteps
            self.num_steps = len(timesteps)
            self.cross_steps = (self.cross_limit() * self.num_steps).long()  # (T,)

    def wants(self, call: AttentionCall) -> bool:
        """Cross-attention always; self-attention only while it is replaced (else the fused kernel runs)."""
        return call.is_cross or (self.clock.step < self.options.self_replace_steps * self.num_steps
                                 and call.query_shape[1] <= self.options.self_max_patches)

    def __call__(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        cfg = getattr(self.pipe, "do_classifier_free_guidance", False)
        half = probs.shape[0] // 2 if cfg else 0
        cond = probs[half:]  # (2, h, Nq, Nk): source, edit
        if cond.shape[0] != 2:
            raise ValueError("Prompt-to-Prompt runs source and edit as one batch of two images")
        step = self.clock.step
        src, edit = cond[0], cond[1]
        if call.is_cross and self.blend_tokens:
            self._collect_blend(cond)
        if call.is_cross:
            replace = (step < self.cross_steps).to(probs.dtype)  # (T,) 1 where the source map is used
            replace = replace * self.aligned.to(probs.dtype)
            new = src[..., self.index] * replace + edit * (1 - replace)
            new = new * self.weights.to(probs.dtype)
        elif step < self.options.self_replace_steps * self.num_steps and probs.shape[-1] <= self.options.self_max_patches:
            new = src
        else:
            return None
        out = probs.clone()
        out[half + 1] = new
        return out


    def _collect_blend(self, cond: torch.Tensor) -> None:
        """Add this layer's attention to the blend words, per image, at the latent resolution."""
        h, w = self.latent_hw
        n = cond.shape[2]
        grid = token_grid(self.latent_hw, n)
        maps = []
        for image in (0, 1):
            cols = [i for src, tgt in self.blend_tokens for i in (src if image == 0 else tgt)]
            m = cond[image][..., cols].sum(-1).sum(0).float() if cols else cond.new_zeros(n).float()  # (Nq,)
            maps.append(m.view(1, 1, *grid))
        m = torch.nn.functional.interpolate(torch.cat(maps), size=(h, w), mode="bilinear", align_corners=False)
        self.blend_map = m[:, 0] if self.blend_map is None else self.blend_map + m[:, 0]

    def blend_latents(self, pipe, step, timestep, kwargs):
        """``callback_on_step_end``: keep the source's latents outside the blend words' region."""
        latents = kwargs["latents"]
        if self.blend_map is not None:
            m = self.blend_map.max(0).values
            mask = (m / (m.max() + 1e-8) > self.options.blend_threshold).to(latents.dtype)  # (H, W)
            latents[1] = latents[0] + mask * (latents[1] - latents[0])
            self.blend_map = None
        return {"latents": latents}


@dataclass
class EditResult:
    source: np.ndarray  # (H, W, 3)
    edited: np.ndarray


def edit(pipe, source: str, target: str, *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
         width: int | None = None, height: int | None = None, options: EditOptions = EditOptions(),
         mode: str = "swap") -> EditResult:
    """Generate ``source`` and its edit ``target`` (word ``swap`` or ``refine``) from the same noise."""
    if mode not in ("swap", "refine"):
        raise ValueError(f"unknown edit mode {mode!r}: swap or refine")
    p2p = PromptToPrompt(pipe, source, target, options, mode)
    names = {b.name: p2p for b in list_blocks(pipe.unet)}
    handle = pipe.unet.register_forward_pre_hook(p2p.on_unet, with_kwargs=True)
    try:
        with explicit_attention(pipe.unet, names, wants=p2p.wants), torch.inference_mode():
            blend = {"callback_on_step_end": p2p.blend_latents} if options.local_blend else {}
            out = pipe([source, target], num_inference_steps=steps, guidance_scale=guidance, width=width,
                       height=height, output_type="np",
                       generator=[torch.Generator().manual_seed(seed) for _ in range(2)], **blend)
    finally:
        handle.remove()
    images = np.asarray(out.images, dtype=np.float32)
    if not finite(images).all():
        raise ValueError("the edit came out non-finite (NaN/inf)")
    return EditResult(images[0], images[1])

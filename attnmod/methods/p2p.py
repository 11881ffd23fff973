"""Prompt-to-Prompt (Hertz et al. 2022): edit an image by editing its prompt, keeping its layout.

Source and edited prompt are generated together in one batch from the same noise; only the conditional
half of the CFG batch is edited. The defaults reproduce google/prompt-to-prompt's controllers, each rule
pinned by a test:

* cross-attention: the edit uses the source's maps (word swap: every token; refinement: the aligned ones,
  added words keep theirs) for the first ``int(f · (T + 1))`` of T steps — the reference's alpha table has
  T + 1 rows; per-word fractions use the field's ``{"default_": 0.8, "cat": 0.4}`` form;
* self-attention: the source's maps for the first ``int(f · T)`` steps, in layers of at most 16×16 = 256
  query patches (``self_max_patches``);
* re-weighting (the equalizer) scales the replaced maps, so it acts only inside a word's cross-replace window;
* local blend: after every step, the edit's latents keep the source's outside a mask built from the blend
  words' cross-attention in the layers at 1/4 of the latent side, accumulated over the steps so far (the edit's
  maps as replaced), averaged over heads and layers, 3×3 max-pooled, upsampled (nearest), normalised per image,
  thresholded, and joined over the source and the edit.

Named departures: ``reweight_every_step=True`` re-weights the edit's own maps at every step (attnmod's earlier
rule); ``blend_downsample`` picks another blend resolution (e.g. 1 on the embedded model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionCall, explicit_attention, token_grid
from ..blocks import downsampling, list_blocks
from ..dit import require_unet
from ..generate import finite
from ..steps import LoopClock
from ..tokenizer import split_words, word_positions


@dataclass(frozen=True)
class EditOptions:
    cross_replace_steps: float | dict[str, float] = 0.8
    self_replace_steps: float = 0.4
    reweight: dict[str, float] = field(default_factory=dict)  # word -> factor for its cross-attention
    self_max_patches: int = 16 * 16  # self maps are replaced only in layers with at most this many query patches
    local_blend: tuple[str, ...] = ()  # words whose region may change; elsewhere the source is kept
    blend_threshold: float = 0.3  # of the blend words' normalised attention
    blend_downsample: int = 4  # the blend reads the cross layers at 1/4 of the latent side (16×16 at 512 px)
    reweight_every_step: bool = False  # departure: re-weight the edit's own maps at every step, not in the window

    def __post_init__(self):
        fractions = self.cross_replace_steps.values() if isinstance(self.cross_replace_steps, dict) else [
            self.cross_replace_steps]
        for f in [*fractions, self.self_replace_steps]:
            if not 0 <= f <= 1:
                raise ValueError(f"replace steps are fractions in [0, 1], got {f}")
        if self.blend_downsample < 1:
            raise ValueError(f"blend_downsample is a factor >= 1, got {self.blend_downsample}")
        if self.self_max_patches < 0:
            raise ValueError(f"self_max_patches must be >= 0, got {self.self_max_patches}")


def cross_replace_count(fraction: float, steps: int) -> int:
    """Steps (from the first) whose cross maps are the source's: the reference's ``int(f · (T + 1))``."""
    return int(fraction * (steps + 1))


def self_replace_count(fraction: float, steps: int) -> int:
    """Steps (from the first) whose self maps are the source's: the reference's ``int(f · T)``."""
    return int(fraction * steps)


def blend_mask(maps: torch.Tensor, latent_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """The local blend's mask. maps: (2, h, w) blend-word attention of [source, edit] -> (H, W) in {0, 1}.

    3×3 max pool, nearest upsampling to the latent, each image normalised by its maximum, thresholded,
    and the union of the two (the reference's ``LocalBlend``)."""
    m = F.max_pool2d(maps[:, None].float(), 3, stride=1, padding=1)  # (2, 1, h, w)
    m = F.interpolate(m, size=latent_hw)  # nearest
    peak = m.amax(dim=(2, 3), keepdim=True)
    m = m / torch.where(peak > 0, peak, torch.ones_like(peak))  # a map of zeros (no blend word) stays empty
    return (m[:, 0] > threshold).any(0)


def _words(tokenizer, prompt: str) -> list[str]:
    return [t.removesuffix("</w>") for t in tokenizer.tokenize(prompt)]


def token_mapping(tokenizer, source: str, target: str, mode: str) -> list[int | None]:
    """For each token position of ``target`` (with start token at 0), the source position it copies, or None.

    ``swap`` requires equal token counts (position i <- i); ``refine`` aligns the longest common
    subsequence of words, so added words map to None; the end tokens align, and every position after the
    edited prompt's end token copies the same position of the source (as the reference's mapper).
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
    end = [len(src) + 1]  # the end tokens align
    tail = list(range(len(tgt) + 2, n))  # after it: position k copies the source's position k
    return (mapping + end + tail)[:n]


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
        self.num_steps = self.self_steps = 0
        self.replaces_self = False
        # per-loop and per-step values the attention reads as tensors, written in place (a compiled UNet reads the
        # same tensors every call: no recompilation per step or per edit)
        self.cross_steps = torch.zeros(n, dtype=torch.long)
        self.self_until = torch.zeros((), dtype=torch.long)  # self-attention replaced while step < this
        self.step = torch.zeros((), dtype=torch.long)
        self.blend_tokens = torch.zeros(2, n)  # (source, edit) x token: 1 for the blend words' tokens
        for word in options.local_blend:
            in_src, in_tgt = word_positions(source_pieces, word), word_positions(self.pieces, word)
            if not in_src and not in_tgt:
                raise ValueError(f"local blend word {word!r} is in neither prompt")
            self.blend_tokens[0, in_src], self.blend_tokens[1, in_tgt] = 1.0, 1.0
        self.blend_layers: set[str] = set()
        if options.local_blend:
            factors = downsampling(pipe.unet)
            cross = {b.name for b in list_blocks(pipe.unet) if b.kind == "cross"}
            self.blend_layers = {name for name in cross if factors.get(name) == options.blend_downsample}
            if not self.blend_layers:
                have = ", ".join(f"1/{f}" for f in sorted({factors[c] for c in cross if c in factors}))
                raise ValueError(f"local blend reads the cross-attention layers at 1/{options.blend_downsample} of "
                                 f"the latent side (blend_downsample) and this model has none; its cross layers "
                                 f"are at {have or 'unknown resolutions'}")
        self.blend_maps = None  # (2, h, w): the blend words' attention, summed over layers, heads and steps so far
        self.blend_share: list[float] = []  # per step: the share of the latent the blend let change

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

    def start(self, steps: int, device=None) -> None:
        """A new sampling loop of ``steps`` steps: compile the per-token replace windows, clear the blend maps.
        The step and window tensors move to ``device`` (the UNet's) once, not per attention call."""
        if device is not None and self.step.device != torch.device(device):
            self.step, self.self_until, self.cross_steps = (t.to(device) for t in (self.step, self.self_until,
                                                                                  self.cross_steps))
        self.num_steps = steps
        self.cross_steps.copy_(torch.tensor([cross_replace_count(f, steps) for f in self.cross_limit().tolist()]))
        self.self_steps = self_replace_count(self.options.self_replace_steps, steps)
        self.self_until.fill_(self.self_steps)
        self.replaces_self = self.self_steps > 0  # a bool: a compiled graph guards on it, not on the count
        self.blend_maps, self.blend_share = None, []

    @torch.compiler.disable  # host-side bookkeeping: never traced into a compiled UNet
    def on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        if self.clock.tick():
            self.start(len(self.pipe.scheduler.timesteps), sample.device)
        self.set_step(self.clock.step)

    def set_step(self, step: int) -> None:
        """The denoising step the next attention calls belong to (written in place: see ``__init__``)."""
        self.step.fill_(step)

    def wants(self, call: AttentionCall) -> bool:
        """Cross-attention always; self-attention in the layers it replaces (at most ``self_max_patches``
        queries, as the reference) when it replaces any step, else the fused kernel runs. The step is not asked
        here: the choice inside the window is a tensor (``__call__``), so a compiled UNet keeps one graph."""
        return call.is_cross or (self.replaces_self and call.query_shape[1] <= self.options.self_max_patches)

    def __call__(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        cfg = getattr(self.pipe, "do_classifier_free_guidance", False)
        half = probs.shape[0] // 2 if cfg else 0
        cond = probs[half:]  # (2, h, Nq, Nk): source, edit
        if cond.shape[0] != 2:
            raise ValueError("Prompt-to-Prompt runs source and edit as one batch of two images")
        src, edit = cond[0], cond[1]
        if call.is_cross:
            new = self._edit_cross(src, edit)
            if call.name in self.blend_layers:
                self._collect_blend(src, new)
        else:  # self-attention: the source's maps inside the window, the edit's own after it
            new = torch.where(self.step < self.self_until, src, edit)
        out = probs.clone()
        out[half + 1] = new
        return out

    def _edit_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        """The edit's cross maps (h, Nq, tokens) at this step."""
        like = dict(device=src.device, dtype=src.dtype)
        in_window = (self.step < self.cross_steps).to(**like)  # on the UNet's device (``start``)  # (tokens,) 1: the source's map this step
        aligned = self.aligned.to(**like)
        replaced = src[..., self.index.to(src.device)] * aligned + edit * (1 - aligned)  # replace_cross_attention
        weights = self.weights.to(**like)
        if self.options.reweight_every_step:
            return (replaced * in_window + edit * (1 - in_window)) * weights
        return replaced * weights * in_window + edit * (1 - in_window)

    def _collect_blend(self, src: torch.Tensor, edit: torch.Tensor) -> None:
        """Add this layer's attention to the blend words (h, Nq, tokens per image), summed over heads; the
        edit's maps are taken as replaced. (The reference averages over heads and layers: the same mask.)"""
        maps = torch.stack([(m.float() * self.blend_tokens[i].to(m.device)).sum(-1).sum(0)
                            for i, m in enumerate((src, edit))])  # (2, Nq)
        maps = maps.view(2, *token_grid(self.latent_hw, maps.shape[1])).cpu()
        self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps

    def blend_latents(self, pipe, step, timestep, kwargs):
        """``callback_on_step_end``: keep the source's latents outside the blend words' region."""
        latents = kwargs["latents"]
        if self.blend_maps is not None:
            mask = blend_mask(self.blend_maps, tuple(latents.shape[-2:]), self.options.blend_threshold)
            self.blend_share.append(float(mask.float().mean()))
            mask = mask.to(latents.device, latents.dtype)
            latents[1] = latents[0] + mask * (latents[1] - latents[0])
        return {"latents": latents}


@dataclass
class EditResult:
    source: np.ndarray  # (H, W, 3)
    edited: np.ndarray
    blend_share: tuple[float, ...] = ()  # with a local blend: per step, the share of the latent allowed to change


def edit(pipe, source: str, target: str, *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
         width: int | None = None, height: int | None = None, options: EditOptions = EditOptions(),
         mode: str = "swap") -> EditResult:
    """Generate ``source`` and its edit ``target`` (word ``swap`` or ``refine``) from the same noise."""
    require_unet(pipe, "Prompt-to-Prompt")
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
    return EditResult(images[0], images[1], tuple(p2p.blend_share))

"""Cross-Image Attention (Alaluf, Garibi et al., SIGGRAPH 2024): zero-shot appearance transfer.

    r = transfer(pipe, structure=img_a, appearance=img_b, options=TransferOptions(noun="animal"))
    r.output, r.structure, r.appearance  # (H, W, 3): the transfer and the two reconstructions

Both images are inverted with edit-friendly DDPM inversion (``inversion.ddpm``). A stock pipeline then
runs the last T − skip steps on the batch [output, appearance, structure], every row replaying its
noise maps (the output the structure's, starting from the structure's noisy latent). In the decoder's
self-attention layers at the two largest resolutions the output row keeps its queries and takes the
appearance row's keys and values (the structure's on every 5th step before step 40), inside a step
window per resolution, with the swapped probabilities contrasted. Swap guidance replaces classifier-free
guidance: ε = ε_noswap + s_i (ε_swap − ε_noswap), s_i falling linearly from s to max(s/2, 1); it is laid
over the pipeline's own CFG — both halves get the same prompt, only the second half swaps, and
``callback_on_step_end`` sets each step's scale. From step 20 the output's latent takes the appearance's
channel statistics (AdaIN), inside the object masks of a self-segmentation of both rows.

The defaults follow garibida/cross-image-attention (100 steps, skip 32, inversion guidance 3.5, windows
(10, 90) and (10, 70) by resolution, contrast 1.67 unnormalised, swap guidance 3.5, AdaIN from step 20):
its attention sees the step of the previous callback (``attention_step``), and it is kept here. Departures,
each named: ``renormalize`` (contrasted rows summing to 1), ``mask="word"`` (the noun's own map above 0.3:
object IoU 0.65-0.67 on the embedded model's mixed scenes, where the reference's segment rule on attnmod's
segmentation leaves most masks empty; benchmarks/segment_eval.py), ``keep_last`` in the inversion (exact
replay); an empty object mask falls back to AdaIN over the whole latent and says so (the reference returns
NaN). The reference rule runs on attnmod's own segmentation and word maps (no nltk).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..attention import AttentionCall, explicit_attention
from ..blocks import downsampling, list_blocks, resolve_blocks
from ..dit import require_unet
from ..generate import finite
from ..inversion.ddpm import DDPMInversion, ddpm_invert, replay_noise
from ..maps import trace
from ..segment import object_mask, reference_object_mask
from ..steps import LoopClock
from .style_aligned import calc_mean_std

OUT, APPEARANCE, STRUCTURE = 0, 1, 2  # rows of the batch, as the reference


@dataclass(frozen=True)
class TransferOptions:
    """The reference code's defaults. ``windows``: per swap resolution, largest first, the [start, end) of
    attention steps; ``blocks`` overrides the swap layers (a selector of self-attention blocks, all using the
    first window)."""

    noun: str = "object"
    prompt: str | None = None  # None: "a photo of a {noun}", for the inversion and all three rows
    steps: int = 100
    skip: int = 32
    inversion_guidance: float = 3.5
    swap_guidance: float = 3.5
    contrast: float = 1.67
    renormalize: bool = False  # departure: rows of the contrasted probabilities sum to 1 again
    windows: tuple[tuple[int, int], ...] = ((10, 90), (10, 70))
    structure_every: int = 5  # every 5th attention step before structure_until: the structure's keys/values
    structure_until: int = 40
    adain: str = "masked"  # "masked", "plain" (whole latent) or "off"
    adain_steps: tuple[int, int] = (20, 100)
    segments: int = 5
    mask: str = "reference"  # object masks: the reference's segment rule, or "word" (the noun's map > 0.3)
    blocks: str | None = None
    seed: int = 42  # the inversions' noise

    def __post_init__(self):
        if self.mask not in ("reference", "word"):
            raise ValueError(f"mask is reference or word, got {self.mask!r}")
        if self.adain not in ("masked", "plain", "off"):
            raise ValueError(f"adain is masked, plain or off, got {self.adain!r}")
        if not 0 <= self.skip < self.steps:
            raise ValueError(f"skip must be in [0, steps), got skip={self.skip}, steps={self.steps}")
        if self.swap_guidance < 1:
            raise ValueError(f"swap_guidance must be >= 1, got {self.swap_guidance}")
        if not self.windows:
            raise ValueError("windows needs at least one (start, end) pair")

    @property
    def text(self) -> str:
        return self.prompt if self.prompt is not None else f"a photo of a {self.noun}"


def attention_step(i: int) -> int:
    """The step the reference's attention sees during loop step ``i``: the index its previous callback set
    (0 before the first)."""
    return max(i - 1, 0)


def swap_guidance_scales(scale: float, steps: int) -> np.ndarray:
    """s_i for the ``steps`` steps that run: linear from ``scale`` to max(scale / 2, 1)."""
    return np.linspace(scale, max(scale / 2, 1.0), steps)


def contrast(probs: torch.Tensor, strength: float, renormalize: bool = False) -> torch.Tensor:
    """Attention contrast: clip((A − mean) · strength + mean, 0, 1), mean over keys. probs: (..., Nq, Nk)."""
    mean = probs.mean(-1, keepdim=True)
    out = ((probs - mean) * strength + mean).clamp(0, 1)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12) if renormalize else out


def latent_adain(content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor | None = None,
                 style_mask: torch.Tensor | None = None) -> torch.Tensor:
    """AdaIN of a latent (C, H, W) towards another's channel statistics over pixels (the masks' pixels only,
    where given: then only the content mask's pixels change)."""
    def tokens(x, mask):  # (C, H, W) -> (1, 1, N, C) over the mask's pixels
        flat = x.flatten(1).T
        return (flat if mask is None else flat[mask.flatten() > 0])[None, None]

    c_mean, c_std = calc_mean_std(tokens(content, content_mask))
    s_mean, s_std = calc_mean_std(tokens(style, style_mask))
    c_mean, c_std, s_mean, s_std = (t.reshape(-1, 1, 1) for t in (c_mean, c_std, s_mean, s_std))
    out = (content - c_mean) / c_std * s_std + s_mean
    if content_mask is None:
        return out
    m = content_mask.to(content.dtype)
    return content * (1 - m) + out * m


def swap_layers(unet, blocks: str | None = None) -> dict[str, int]:
    """Swap layers -> index of their window: the decoder's self-attention at the two largest resolutions
    (largest first), or the self-attention blocks ``blocks`` selects (window 0)."""
    if blocks is not None:
        chosen = [b.name for b in resolve_blocks(unet, blocks) if b.kind == "self"]
        if not chosen:
            raise ValueError(f"no self-attention blocks match {blocks!r}")
        return dict.fromkeys(chosen, 0)
    factors = downsampling(unet)
    decoder = [b.name for b in list_blocks(unet) if b.kind == "self" and b.name.startswith("up_blocks")]
    resolutions = sorted({factors[n] for n in decoder})[:2]  # smallest downsampling = largest resolution
    return {n: resolutions.index(factors[n]) for n in decoder if factors[n] in resolutions}


class CrossImageAttention:
    """The swap (q/k/v hook) and contrast (probs hook) of the output row, at the loop's step."""

    def __init__(self, pipe, layers: dict[str, int], options: TransferOptions):
        self.pipe = pipe
        self.layers = layers
        self.o = options
        self.clock = LoopClock(pipe)

    def on_unet(self, module, args, kwargs):
        self.clock.tick()

    def _swap_row(self, batch: int) -> int:
        """The output row of the swapping half: the second (cond) half under CFG, else the only one."""
        return batch // 2 + OUT if getattr(self.pipe, "do_classifier_free_guidance", False) else OUT

    def swaps(self, call: AttentionCall) -> bool:
        window = self.layers.get(call.name)
        if window is None or call.is_cross:
            return False
        start, end = self.o.windows[min(window, len(self.o.windows) - 1)]
        return start <= attention_step(self.clock.step) < end

    def qkv(self, call: AttentionCall, q, k, v):
        if not self.swaps(call):
            return q, k, v, None
        step = attention_step(self.clock.step)
        out = self._swap_row(q.shape[0])
        source = out - OUT + (STRUCTURE if step % self.o.structure_every == 0 and step < self.o.structure_until
                              else APPEARANCE)
        k, v = k.clone(), v.clone()
        k[out], v[out] = k[source], v[source]
        return q, k, v, None

    def probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        out = self._swap_row(probs.shape[0])
        probs[out] = contrast(probs[out], self.o.contrast, self.o.renormalize)  # in place: built for this call only
        return probs


@dataclass
class TransferResult:
    output: np.ndarray  # (H, W, 3)
    appearance: np.ndarray  # the appearance row: its reconstruction
    structure: np.ndarray
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # "appearance", "structure": (H, W) latent masks
    notes: list[str] = field(default_factory=list)  # fallbacks taken


def invert(pipe, image: Image.Image, options: TransferOptions) -> DDPMInversion:
    """An input image inverted as the transfer replays it."""
    return ddpm_invert(pipe, image, options.text, steps=options.steps, guidance=options.inversion_guidance,
                       generator=torch.Generator().manual_seed(options.seed))


def transfer(pipe, structure: Image.Image | DDPMInversion, appearance: Image.Image | DDPMInversion,
             options: TransferOptions = TransferOptions()) -> TransferResult:
    """The structure image's layout and shapes with the appearance image's colours and textures."""
    require_unet(pipe, "Cross-Image Attention")
    o = options
    layers = swap_layers(pipe.unet, o.blocks)
    if o.adain == "masked" and o.noun.lower() not in o.text.lower().split():
        raise ValueError(f"the object noun {o.noun!r} is not in the prompt {o.text!r} (masked AdaIN labels the "
                         "segments with its cross-attention)")
    inv_s = structure if isinstance(structure, DDPMInversion) else invert(pipe, structure, o)
    inv_a = appearance if isinstance(appearance, DDPMInversion) else invert(pipe, appearance, o)
    if inv_s.latents.shape != inv_a.latents.shape:
        raise ValueError(f"structure and appearance differ in size or steps: {tuple(inv_s.latents.shape)} vs "
                         f"{tuple(inv_a.latents.shape)}")
    run = o.steps - o.skip
    scales = swap_guidance_scales(o.swap_guidance, run)
    latents = torch.stack([inv_s.latents[o.skip], inv_a.latents[o.skip], inv_s.latents[o.skip]])
    noise = [inv_s.noise[o.skip :], inv_a.noise[o.skip :], inv_s.noise[o.skip :]]
    hooks = CrossImageAttention(pipe, layers, o)
    result = TransferResult(np.zeros(0), np.zeros(0), np.zeros(0))
    mask_step = o.adain_steps[0]
    tracer = (_mask_tracer(pipe, layers, mask_step, max(latents.shape[-2:])) if o.adain == "masked" and mask_step < run
              else None)

    def on_step_end(pipeline, i, timestep, kwargs):
        x = kwargs["latents"]
        if o.swap_guidance > 1 and i + 1 < run:  # the next step's scale; above 1 so the pipeline keeps two halves
            pipeline._guidance_scale = max(float(scales[i + 1]), 1.000001)
        if tracer is not None and i == mask_step:  # the tracer captured this step's maps only
            _masks(tracer, o, x, result)
        if o.adain != "off" and o.adain_steps[0] <= i < o.adain_steps[1]:
            masks = (result.masks.get("structure"), result.masks.get("appearance"))
            x[OUT] = latent_adain(x[OUT], x[APPEARANCE], *masks)
        return {"latents": x}

    handle = pipe.unet.register_forward_pre_hook(hooks.on_unet, with_kwargs=True)
    try:
        with replay_noise(pipe, noise, skip=o.skip), \
                explicit_attention(pipe.unet, dict.fromkeys(layers, hooks.probs), dict.fromkeys(layers, hooks.qkv),
                                   wants=hooks.swaps), \
                tracer if tracer is not None else nullcontext(), torch.inference_mode():
            images = pipe([o.text] * 3, negative_prompt=[o.text] * 3 if o.swap_guidance > 1 else None,
                          latents=latents.to(pipe.unet.device, pipe.unet.dtype), num_inference_steps=o.steps,
                          guidance_scale=float(scales[0]) if o.swap_guidance > 1 else 1.0, output_type="np",
                          callback_on_step_end=on_step_end).images
    finally:
        handle.remove()
    images = np.asarray(images, dtype=np.float32)
    if not finite(images).all():
        raise ValueError("the transfer came out non-finite (NaN/inf)")
    result.output, result.appearance, result.structure = images[OUT], images[APPEARANCE], images[STRUCTURE]
    return result


def _mask_tracer(pipe, layers: dict[str, int], step: int, latent_side: int) -> trace:
    """Attention maps of loop step ``step`` for the object masks: every cross-attention block and the
    self-attention blocks that do not swap, self-attention at the largest of their resolutions (the reference
    segments at its 'step 19' too)."""
    blocks = list_blocks(pipe.unet)
    keep = [b.name for b in blocks if b.kind == "cross" or b.name not in layers]
    factors = downsampling(pipe.unet)
    own = [factors[b.name] for b in blocks if b.kind == "self" and b.name not in layers and b.name in factors]
    if not own:
        raise ValueError("masked AdaIN needs self-attention blocks that do not swap (blocks=...); use adain='plain'")
    return trace(pipe, blocks=keep, steps=(step, step + 1), self_resolution=max(1, latent_side // min(own)))


def _masks(tracer: trace, o: TransferOptions, latents: torch.Tensor, result: TransferResult) -> None:
    """Object masks of the appearance and structure rows at the latent's resolution (empty: AdaIN falls back
    to the whole latent, and a note says so)."""
    maps = tracer.result([o.text] * 3)
    for name, row in (("appearance", APPEARANCE), ("structure", STRUCTURE)):
        mask = (reference_object_mask(maps, o.noun, row, k=o.segments) if o.mask == "reference"
                else object_mask(maps, o.noun, row)).float()  # (H, W) at the latent's resolution
        if mask.sum() < 2:
            result.notes.append(f"no segment of the {name} image was labelled {o.noun!r}: AdaIN over the whole latent")
        else:
            result.masks[name] = mask.to(latents.device)
    if len(result.masks) < 2:  # both masks or none
        result.masks.clear()

"""MultiDiffusion panoramas (Bar-Tal et al., ICML 2023), optionally in one reference's style (StyleAligned).

    r = panorama(pipe, "a large red circle, on a striped yellow background", width=256)
    r.image                                                       # (H, W, 3) in [0, 1]
    r = panorama(pipe, prompt, width=256, reference="a large blue star, on a dotted white background")
    r.image, r.reference                                          # every window shares attention with the reference

A wide latent is denoised window by window: at every step each window (the model's own size, ``stride`` latent
pixels apart) is a UNet input of its own, takes one scheduler step from its crop, and every latent pixel becomes
the mean of the windows that cover it. The denoising loop is owned here (``multidiffusion``): diffusers' panorama
pipeline is deprecated, and MultiDiffusion needs a step per window, which no stock pipeline exposes. Each window
keeps its own copy of the scheduler, so multistep schedulers keep one history per window (as diffusers' panorama
pipeline did). With a style reference the batch of every UNet call is [reference, windows...] under
``style_aligned`` (reference index 0): every window attends to the reference's keys and values after AdaIN, the
reference attends to itself only, so it is the image its prompt and seed give alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..dit import require_unet
from ..generate import finite
from ..inversion.ddim import unet_conditioning
from .style_aligned import StyleAlignedOptions, style_aligned


@dataclass(frozen=True)
class PanoramaOptions:
    stride: int = 8  # latent pixels between windows (MultiDiffusion's 8)
    window: int | None = None  # window side in latent pixels; None: the UNet's sample size (its native image)
    view_batch: int = 0  # windows per UNet call; 0: all at once

    def __post_init__(self):
        if self.stride < 1 or (self.window is not None and self.window < 1) or self.view_batch < 0:
            raise ValueError(f"stride and window must be >= 1 and view_batch >= 0, got {self}")


@dataclass
class PanoramaResult:
    image: np.ndarray  # (H, W, 3)
    references: list[np.ndarray]  # (h, w, 3) each: the style references, as generated (or reconstructed)
    views: list[tuple[int, int, int, int]]  # (top, left, bottom, right) of each window, latent pixels


def views(height: int, width: int, window: tuple[int, int], stride: int) -> list[tuple[int, int, int, int]]:
    """Windows (top, left, bottom, right) of a (height, width) latent: ``window`` = (h, w), ``stride`` apart, the
    first at the top-left corner and the last at the opposite edges. Each side must be the window's plus a whole
    number of strides (ValueError otherwise)."""
    h, w = window
    for side, win, name in ((height, h, "height"), (width, w, "width")):
        if side < win or (side - win) % stride:
            raise ValueError(f"the panorama's latent {name} {side} must be the window's {win} plus a multiple of the "
                             f"stride {stride} (image: multiples of {stride * 8} pixels beyond the window)")
    return [(top, left, top + h, left + w) for top in range(0, height - h + 1, stride)
            for left in range(0, width - w + 1, stride)]


def average_views(shape, windows: Sequence[tuple[int, int, int, int]], crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """MultiDiffusion's update: every latent pixel the mean of the window crops covering it. shape: (B, C, H, W);
    crops: one (B, C, h, w) per window."""
    value = torch.zeros(shape, dtype=crops[0].dtype, device=crops[0].device)
    count = torch.zeros(shape, dtype=crops[0].dtype, device=crops[0].device)
    for (top, left, bottom, right), crop in zip(windows, crops, strict=True):
        value[..., top:bottom, left:right] += crop
        count[..., top:bottom, left:right] += 1
    return value / count.clamp(min=1)


@dataclass
class Reference:
    """A style reference denoised beside the windows: its latent (1, C, h, w), its conditioning, and optionally the
    DDIM inversion it replays (clean latent first)."""

    latent: torch.Tensor
    conditioning: tuple[torch.Tensor, dict]
    trajectory: Sequence[torch.Tensor] | None = None


def reference_weights(windows: Sequence[tuple[int, int, int, int]], references: int) -> torch.Tensor:
    """(V, R) weights of each window for each reference: references anchored evenly from the first window's centre to
    the last's; a window takes the two anchors around its centre, weighted linearly by distance (rows sum to 1)."""
    centres = torch.tensor([(left + right) / 2 for _, left, _, right in windows], dtype=torch.float64)
    if references == 1 or centres.max() == centres.min():
        return torch.full((len(windows), references), 1 / references, dtype=torch.float64)
    anchors = torch.linspace(float(centres.min()), float(centres.max()), references, dtype=torch.float64)
    spacing = anchors[1] - anchors[0]
    weights = (1 - (centres[:, None] - anchors[None, :]).abs() / spacing).clamp(min=0)
    return weights / weights.sum(1, keepdim=True)


def multidiffusion(unet, scheduler, latents: torch.Tensor, windows: Sequence[tuple[int, int, int, int]],
                   conditioning: tuple[torch.Tensor, dict], guidance: float, references: Sequence[Reference] = (),
                   weights: torch.Tensor | None = None, style: Callable[[int], object] | None = None,
                   view_batch: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None):
    """The owned loop: denoise ``latents`` (1, C, H, W) over ``scheduler.timesteps`` window by window.

    ``conditioning``: (context, extra UNet kwargs) of one window, [uncond, cond] when ``guidance`` > 1.
    With ``references``, each UNet call's batch is [reference r, windows with a weight for r] inside ``style(n)``
    (a context manager for a batch of n images, reference first: StyleAligned), and a window's next latent is the
    ``weights`` (V, R)-weighted sum of its steps beside each reference. A reference is denoised once per step (it
    attends to itself only), or replayed from its inversion: after step i, the inverted latent of the next timestep.
    Returns (latents, the references' latents)."""
    cfg = guidance > 1
    halves = 2 if cfg else 1
    per_call = view_batch or len(windows)
    R = max(1, len(references))
    weights = torch.ones(len(windows), 1, dtype=torch.float64) if weights is None else weights
    schedulers = [[copy.deepcopy(scheduler) for _ in range(R)] for _ in windows]  # one history per window stream
    ref_schedulers = [copy.deepcopy(scheduler) for _ in references]
    ref_latents = [r.latent for r in references]

    def rows(cond: tuple, n: int) -> tuple:
        """One conditioning per row: (halves·n, ...) from a (halves, ...) one."""
        context, extra = cond
        ctx = context.view(halves, 1, *context.shape[1:]).expand(-1, n, *context.shape[1:]).reshape(
            halves * n, *context.shape[1:])
        kw = {k: {m: t.view(halves, 1, *t.shape[1:]).expand(-1, n, *t.shape[1:]).reshape(halves * n, *t.shape[1:])
                  for m, t in v.items()} for k, v in extra.items()}
        return ctx, kw

    def joined(ref_cond: tuple, cond: tuple) -> tuple:
        """[reference, windows] rows within each CFG half."""
        ctx = torch.cat([ref_cond[0].view(halves, 1, *ref_cond[0].shape[1:]),
                         cond[0].view(halves, -1, *cond[0].shape[1:])], dim=1).flatten(0, 1)
        kw = {k: {m: torch.cat([ref_cond[1][k][m].view(halves, 1, -1), t.view(halves, -1, t.shape[-1])],
                               dim=1).flatten(0, 1) for m, t in v.items()} for k, v in cond[1].items()}
        return ctx, kw

    for i, t in enumerate(scheduler.timesteps):
        crops: list[torch.Tensor | None] = [None] * len(windows)
        new_refs: list[torch.Tensor | None] = [None] * len(references)
        for r in range(R):
            chosen = [j for j in range(len(windows)) if weights[j, r] > 0]
            for start in range(0, len(chosen), per_call):
                chunk = chosen[start : start + per_call]
                batch = torch.cat([latents[..., a:c, b:d] for a, b, c, d in (windows[j] for j in chunk)])
                cond = rows(conditioning, len(chunk))
                if references:
                    batch = torch.cat([ref_latents[r], batch])
                    cond = joined(references[r].conditioning, cond)
                model_in = scheduler.scale_model_input(torch.cat([batch] * halves), t)
                with style(len(batch)) if references else nullcontext():
                    noise = unet(model_in, t, encoder_hidden_states=cond[0], **cond[1]).sample
                if cfg:
                    u, c = noise.chunk(2)
                    noise = u + guidance * (c - u)
                if references:
                    if new_refs[r] is None:  # it attends to itself only: every call computes the same row
                        new_refs[r] = ref_schedulers[r].step(noise[:1], t, ref_latents[r]).prev_sample
                    noise, batch = noise[1:], batch[1:]
                for k, j in enumerate(chunk):
                    step = schedulers[j][r].step(noise[k : k + 1], t, batch[k : k + 1]).prev_sample
                    if R > 1:
                        step = step * float(weights[j, r])
                    crops[j] = step if crops[j] is None else crops[j] + step
        latents = average_views(latents.shape, windows, crops)
        for r, ref in enumerate(references):
            ref_latents[r] = new_refs[r] if ref.trajectory is None else ref.trajectory[-2 - i].to(new_refs[r])
        if callback is not None:
            callback(i, latents)
    return latents, ref_latents


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(image, output_type="np")[0], dtype=np.float32)


@dataclass(frozen=True)
class StyleRef:
    """A style reference: its prompt, generated with ``seed`` (None: the panorama's seed) at the window's size, or —
    with ``image`` (a PIL image of the window's size) — the prompt describing that image, DDIM-inverted and
    replayed."""

    prompt: str
    seed: int | None = None
    image: object = None


@torch.no_grad()
def panorama(pipe, prompt: str, width: int, height: int | None = None, *, steps: int = 20, guidance: float = 7.5,
             seed: int = 0, negative_prompt: str = "", options: PanoramaOptions = PanoramaOptions(),
             references: Sequence[StyleRef] = (), style: StyleAlignedOptions | None = None,
             callback: Callable[[int, torch.Tensor], None] | None = None) -> PanoramaResult:
    """A ``width`` × ``height`` image of ``prompt`` (height: the model's size), optionally in the style of
    ``references``: one for the whole panorama, or several anchored evenly from left to right, each window
    following the two around it, weighted by distance (``reference_weights``)."""
    require_unet(pipe, "MultiDiffusion panoramas")
    f = pipe.vae_scale_factor
    win = options.window or pipe.unet.config.sample_size
    height = height or win * f
    if width % f or height % f:
        raise ValueError(f"panorama size must be a multiple of {f} pixels, got {width}x{height}")
    windows = views(height // f, width // f, (win, win), options.stride)
    for ref in references:
        if ref.image is not None and ref.image.size != (win * f, win * f):
            raise ValueError(f"a reference image is {ref.image.width}x{ref.image.height}; the panorama's windows are "
                             f"{win * f}x{win * f}")
    if len(references) > len(windows):
        raise ValueError(f"{len(references)} references for {len(windows)} windows: at most one per window")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    cfg = guidance > 1
    size = (win * f, win * f)
    conditioning = unet_conditioning(pipe, prompt, cfg, size=size, negative_prompt=negative_prompt)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    refs = []
    for ref in references:
        if ref.image is not None:
            from ..inversion.ddim import ddim_invert

            trajectory = ddim_invert(pipe, ref.image, ref.prompt, steps=steps)
            refs.append(Reference(trajectory[-1].to(device, dtype), unet_conditioning(pipe, ref.prompt, cfg, size=size),
                                  trajectory))
        else:
            g = torch.Generator().manual_seed(seed if ref.seed is None else ref.seed)
            noise = torch.randn((1, shape[1], win, win), generator=g).to(device, dtype)
            refs.append(Reference(noise, unet_conditioning(pipe, ref.prompt, cfg, size=size)))
    pipe.scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    latents = latents * pipe.scheduler.init_noise_sigma
    for ref in refs:
        if ref.trajectory is None:
            ref.latent = ref.latent * pipe.scheduler.init_noise_sigma
    options_ = style or StyleAlignedOptions()
    latents, ref_latents = multidiffusion(
        pipe.unet, pipe.scheduler, latents, windows, conditioning, guidance, refs,
        reference_weights(windows, len(refs)) if refs else None,
        lambda n: style_aligned(pipe, images=n, options=options_), options.view_batch, callback)
    image = _decode(pipe, latents)
    if not finite(image[None]).all():
        raise ValueError("the panorama came out non-finite (NaN/inf)")
    return PanoramaResult(image, [_decode(pipe, x) for x in ref_latents], windows)

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
from dataclasses import dataclass

import numpy as np
import torch

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
    reference: np.ndarray | None  # (h, w, 3): the style reference, as generated
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


def multidiffusion(unet, scheduler, latents: torch.Tensor, windows: Sequence[tuple[int, int, int, int]],
                   conditioning: tuple[torch.Tensor, dict], guidance: float,
                   reference: torch.Tensor | None = None, reference_conditioning: tuple | None = None,
                   view_batch: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None,
                   reference_trajectory: Sequence[torch.Tensor] | None = None):
    """The owned loop: denoise ``latents`` (1, C, H, W) over ``scheduler.timesteps`` window by window.

    ``conditioning``: (context, extra UNet kwargs) of one window, [uncond, cond] when ``guidance`` > 1.
    ``reference`` (1, C, h, w) with its ``reference_conditioning``: a latent denoised in front of every call's
    windows (StyleAligned's reference); with ``reference_trajectory`` (a DDIM inversion, clean first) it is
    replayed instead: after step i it is the inverted latent of the next timestep. Returns (latents, reference)."""
    cfg = guidance > 1
    halves = 2 if cfg else 1
    per_call = view_batch or len(windows)
    chunks = [list(range(i, min(i + per_call, len(windows)))) for i in range(0, len(windows), per_call)]
    view_schedulers = [copy.deepcopy(scheduler) for _ in windows]
    ref_scheduler = copy.deepcopy(scheduler) if reference is not None else None

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
        crops, new_ref = [], None
        for chunk in chunks:
            batch = torch.cat([latents[..., a:c, b:d] for a, b, c, d in (windows[j] for j in chunk)])
            cond = rows(conditioning, len(chunk))
            if reference is not None:
                batch = torch.cat([reference, batch])
                cond = joined(reference_conditioning, cond)
            model_in = torch.cat([batch] * halves)
            model_in = scheduler.scale_model_input(model_in, t)
            noise = unet(model_in, t, encoder_hidden_states=cond[0], **cond[1]).sample
            if cfg:
                u, c = noise.chunk(2)
                noise = u + guidance * (c - u)
            if reference is not None:
                if new_ref is None:  # the reference attends to itself only: every chunk computes the same row
                    new_ref = ref_scheduler.step(noise[:1], t, reference).prev_sample
                noise = noise[1:]
            for k, j in enumerate(chunk):
                crop = batch[k + (reference is not None) : k + (reference is not None) + 1]
                crops.append(view_schedulers[j].step(noise[k : k + 1], t, crop).prev_sample)
        latents = average_views(latents.shape, windows, crops)
        if reference is not None:
            reference = new_ref if reference_trajectory is None else reference_trajectory[-2 - i].to(new_ref)
        if callback is not None:
            callback(i, latents)
    return latents, reference


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(image, output_type="np")[0], dtype=np.float32)


@torch.no_grad()
def panorama(pipe, prompt: str, width: int, height: int | None = None, *, steps: int = 20, guidance: float = 7.5,
             seed: int = 0, negative_prompt: str = "", options: PanoramaOptions = PanoramaOptions(),
             reference: str | None = None, reference_seed: int | None = None, reference_image=None,
             style: StyleAlignedOptions | None = None,
             callback: Callable[[int, torch.Tensor], None] | None = None) -> PanoramaResult:
    """A ``width`` × ``height`` image of ``prompt`` (height: the model's size), optionally in the style of
    ``reference``: a prompt, generated with ``reference_seed`` (default ``seed``) at the window's size, or — with
    ``reference_image`` (a PIL image of the window's size) — the prompt describing that image, which is
    DDIM-inverted and replayed."""
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size
    win = options.window or native
    height = height or win * f
    if width % f or height % f:
        raise ValueError(f"panorama size must be a multiple of {f} pixels, got {width}x{height}")
    windows = views(height // f, width // f, (win, win), options.stride)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    cfg = guidance > 1
    conditioning = unet_conditioning(pipe, prompt, cfg, size=(win * f, win * f), negative_prompt=negative_prompt)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    pipe.scheduler.set_timesteps(steps, device=device)
    latents = latents * pipe.scheduler.init_noise_sigma
    ref_latent = ref_cond = trajectory = None
    if reference_image is not None and reference is None:
        raise ValueError("a reference image needs the prompt that describes it (used for its inversion)")
    if reference is not None:
        ref_cond = unet_conditioning(pipe, reference, cfg, size=(win * f, win * f))
        if reference_image is not None:
            from ..inversion.ddim import ddim_invert

            if reference_image.size != (win * f, win * f):
                raise ValueError(f"the reference image is {reference_image.width}x{reference_image.height}; the "
                                 f"panorama's windows are {win * f}x{win * f}")
            trajectory = ddim_invert(pipe, reference_image, reference, steps=steps)
            pipe.scheduler.set_timesteps(steps, device=device)
            ref_latent = trajectory[-1].to(device, dtype)
        else:
            g = torch.Generator().manual_seed(seed if reference_seed is None else reference_seed)
            ref_latent = torch.randn((1, shape[1], win, win), generator=g).to(device, dtype)
            ref_latent = ref_latent * pipe.scheduler.init_noise_sigma
    if reference is None:
        latents, _ = multidiffusion(pipe.unet, pipe.scheduler, latents, windows, conditioning, guidance,
                                    view_batch=options.view_batch, callback=callback)
    else:
        per_call = options.view_batch or len(windows)
        with style_aligned(pipe, images=1 + min(per_call, len(windows)), options=style or StyleAlignedOptions()):
            if len(windows) % per_call:
                raise ValueError(f"with a style reference, view_batch must divide the {len(windows)} windows")
            latents, ref_latent = multidiffusion(pipe.unet, pipe.scheduler, latents, windows, conditioning, guidance,
                                                 ref_latent, ref_cond, options.view_batch, callback, trajectory)
    image = _decode(pipe, latents)
    ref_image = _decode(pipe, ref_latent) if ref_latent is not None else None
    if not finite(image[None]).all():
        raise ValueError("the panorama came out non-finite (NaN/inf)")
    return PanoramaResult(image, ref_image, windows)

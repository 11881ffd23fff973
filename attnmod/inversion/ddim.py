"""DDIM inversion of a real image with diffusers' ``DDIMInverseScheduler`` (for StyleAligned references).

    trajectory = ddim_invert(pipe, image, "a large red circle ...", steps=20)
    trajectory[0] is the clean latent, trajectory[-1] the noise it maps to; replaying it backwards
    (``replay_reference``) puts the real image in one slot of a generated batch.

Inversion runs at guidance 1 by default: classifier-free guidance breaks DDIM's local-linearity
assumption and the round trip drifts (the StyleAligned authors invert at guidance 1 as well).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMInverseScheduler
from PIL import Image

from ..dit import require_unet


def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """RGB image of the pipeline's size -> scaled VAE latent (1, 4, h, w)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if image.size != (size, size):
        raise ValueError(f"the reference image is {image.width}x{image.height}; this model makes {size}x{size} "
                         f"images: resize it first (e.g. image.resize(({size}, {size})))")
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def unet_conditioning(pipe, prompt: str, cfg: bool, size: tuple[int, int] | None = None,
                      negative_prompt: str = "") -> tuple[torch.Tensor, dict]:
    """Prompt conditioning for direct UNet calls: (context, extra UNet kwargs), [uncond, cond] with CFG (uncond:
    ``negative_prompt``).

    SD1.x: the text embedding. SDXL: both encoders' embedding plus the pooled embedding and the size
    conditioning (original size = target size = ``size`` (height, width), default the model's native size, no
    crop), as the pipeline builds them.
    """
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None:
        cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
        return (torch.cat([uncond, cond]) if cfg else cond), {}
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=cfg,
                                                             negative_prompt=negative_prompt)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    h, w = size or (side, side)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=device)
    if cfg:
        cond, pooled, time_ids = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled]), time_ids.repeat(2, 1)
    return cond, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def ddim_invert(pipe, image: Image.Image, prompt: str, steps: int = 20, guidance: float = 1.0,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Latents [x_0, x_1, ..., x_T] from the image towards noise along the DDIM ODE (SD1.x and SDXL)."""
    require_unet(pipe, "DDIM inversion")
    device = pipe.unet.device
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps, device=device)
    context, extra = unet_conditioning(pipe, prompt, guidance > 1)
    latent = encode_image(pipe, image)
    trajectory = [latent]
    for i, t in enumerate(inverse.timesteps):
        model_in = torch.cat([latent] * 2) if guidance > 1 else latent
        noise = pipe.unet(model_in, t, encoder_hidden_states=context, **extra).sample
        if guidance > 1:
            u, c = noise.chunk(2)
            noise = u + guidance * (c - u)
        latent = inverse.step(noise, t, latent).prev_sample
        trajectory.append(latent)
        if callback is not None:
            callback(i, latent)
    return trajectory


def replay_reference(trajectory: list[torch.Tensor], index: int = 0):
    """A ``callback_on_step_end`` that puts the inverted trajectory into batch slot ``index`` each step.

    Start the pipeline with ``latents`` whose slot ``index`` is ``trajectory[-1]``; after denoising step
    ``i`` the slot is reset to the inverted latent of the next timestep.
    """
    def callback(pipe, step: int, timestep, kwargs):
        latents = kwargs["latents"]
        latents[index] = trajectory[-2 - step][0].to(latents.dtype)  # the latent at the next timestep
        return {"latents": latents}

    return callback

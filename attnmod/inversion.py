"""DDIM inversion of a real image with diffusers' ``DDIMInverseScheduler`` (for StyleAligned references).

    trajectory = ddim_invert(pipe, image, "a large red circle ...", steps=20)
    trajectory[0] is the clean latent, trajectory[-1] the noise it maps to; replaying it backwards
    (``replay_reference``) puts the real image in one slot of a generated batch.

Inversion runs at guidance 1 by default: classifier-free guidance breaks DDIM's local-linearity
assumption and the round trip drifts (the StyleAligned authors invert at guidance 1 as well). SD1.x only
for now.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMInverseScheduler
from PIL import Image


def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """RGB image of the pipeline's size -> scaled VAE latent (1, 4, h, w)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if image.size != (size, size):
        raise ValueError(f"the reference image is {image.width}x{image.height}; this model makes {size}x{size} "
                         f"images: resize it first (e.g. image.resize(({size}, {size})))")
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def ddim_invert(pipe, image: Image.Image, prompt: str, steps: int = 20, guidance: float = 1.0,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Latents [x_0, x_1, ..., x_T] from the image towards noise along the DDIM ODE."""
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("DDIM inversion supports SD1.x pipelines for now")
    device = pipe.unet.device
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps, device=device)
    cond, uncond = pipe.encode_prompt(prompt, device, 1, guidance > 1, "")
    context = torch.cat([uncond, cond]) if guidance > 1 else cond
    latent = encode_image(pipe, image)
    trajectory = [latent]
    for i, t in enumerate(inverse.timesteps):
        model_in = torch.cat([latent] * 2) if guidance > 1 else latent
        noise = pipe.unet(model_in, t, encoder_hidden_states=context).sample
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

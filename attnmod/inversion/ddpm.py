"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024) and its replay in a stock pipeline.

    inv = ddpm_invert(pipe, image, "a photo of a cat", steps=100, guidance=3.5)
    with replay_noise(pipe, [inv.noise]):
        pipe("a photo of a cat", latents=inv.latents[0][None], num_inference_steps=100, guidance_scale=3.5)
    # -> the image again: the final latent is the image's own VAE latent (up to float rounding)

Unlike DDIM inversion, nothing is integrated: every timestep gets its own noisy latent drawn
independently from the clean one, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε_t, and the noise map z_t is whatever
makes a DDPM (DDIM with η = 1) step from x_t land exactly on x_{t−1}. Replaying those maps with the same
prompt and guidance reproduces the image exactly; editing the prompt or the attention while replaying
them edits it (the Cross-Image Attention authors' appearance transfer replays them).

``replay_noise`` lays the replay over a stock pipeline by swapping in a DDIM (η = 1) scheduler whose
step takes each batch row's stored noise (``variance_noise``) instead of random noise, optionally
running only the last ``T − skip`` steps; the pipeline's own scheduler is restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from PIL import Image

from ..dit import require_unet
from .ddim import encode_image, unet_conditioning


@dataclass
class DDPMInversion:
    """One image inverted: ``latents[i]`` is x at sampling step i (``latents[-1]`` the clean latent),
    ``noise[i]`` the map that takes step i from ``latents[i]`` to ``latents[i + 1]`` (the last one is 0)."""

    latents: torch.Tensor  # (T + 1, C, h, w)
    noise: torch.Tensor  # (T, C, h, w)
    timesteps: torch.Tensor  # (T,) sampling order, largest first
    prompt: str
    guidance: float


def ddpm_scheduler(pipe) -> DDIMScheduler:
    """The DDPM sampler of the inversion: DDIM with η = 1 on the pipeline's noise schedule."""
    return DDIMScheduler.from_config(pipe.scheduler.config)


def noisy_latents(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε_t for every timestep, each ε_t drawn on its own. x0: (1, C, h, w) ->
    (T + 1, C, h, w) in sampling order, the clean latent last."""
    abar = scheduler.alphas_cumprod[scheduler.timesteps.long().cpu()].to(x0.device, torch.float32)  # (T,)
    eps = torch.randn((len(abar), *x0.shape[1:]), generator=generator, dtype=torch.float32).to(x0.device)
    xts = abar.sqrt()[:, None, None, None] * x0.float() + (1 - abar).sqrt()[:, None, None, None] * eps
    return torch.cat([xts, x0.float()]).to(x0.dtype)


def _alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_prev) of a step, float64 scalars."""
    prev = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod.double()
    return abar[int(timestep)], abar[prev] if prev >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()


def step_std(scheduler, timestep) -> float:
    """σ_t of a DDPM step (DDIM with η = 1): √((1 − ᾱ_prev) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_prev))."""
    abar, abar_prev = _alphas(scheduler, timestep)
    return float((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5


def ddpm_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step with the given noise: x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z.
    -> (x_prev, x̂_0). The DDIM (η = 1) step of the reference code, for epsilon, v and sample prediction; the
    direction's coefficient is clamped at 0 (diffusers' DDIM step gives NaN there at a zero-terminal-SNR
    schedule's first step, where it is 0 up to rounding)."""
    abar, abar_prev = _alphas(scheduler, timestep)
    kind = scheduler.config.prediction_type
    x, out = sample.double(), model_output.double()
    if kind == "epsilon":
        x0, eps = (x - (1 - abar).sqrt() * out) / abar.sqrt(), out
    elif kind == "v_prediction":
        x0, eps = abar.sqrt() * x - (1 - abar).sqrt() * out, abar.sqrt() * out + (1 - abar).sqrt() * x
    elif kind == "sample":
        x0, eps = out, (x - abar.sqrt() * out) / (1 - abar).sqrt()
    else:
        raise ValueError(f"unknown prediction type {kind!r}")
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    prev = abar_prev.sqrt() * x0 + (1 - abar_prev - var).clamp_min(0).sqrt() * eps + var.sqrt() * noise.double()
    return prev.to(sample.dtype), x0.to(sample.dtype)


@torch.no_grad()
def ddpm_invert(pipe, image: Image.Image, prompt: str = "", steps: int = 100, guidance: float = 3.5,
                generator: torch.Generator | None = None, keep_last: bool = True,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> DDPMInversion:
    """The image's noisy latents and noise maps (SD1.x and SDXL). ``guidance`` > 1 uses classifier-free
    guidance against the empty prompt, as the reference code (3.5).

    ``keep_last=False`` sets the last step's map to 0, as the reference code does; its replay then ends on
    that step's mean, not on the image (a small gap on SD1.5's timesteps, 0.33 in the latent on the
    embedded model's trailing schedule). Kept by default, so that the replay is exact."""
    require_unet(pipe, "DDPM inversion")
    scheduler = ddpm_scheduler(pipe)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    cfg = guidance > 1
    context, extra = unet_conditioning(pipe, prompt, cfg)
    xts = noisy_latents(scheduler, encode_image(pipe, image), generator)
    noise = torch.zeros_like(xts[:-1])
    for i, t in enumerate(scheduler.timesteps):
        x = xts[i : i + 1]
        model_in = torch.cat([x] * 2) if cfg else x
        out = pipe.unet(model_in, t, encoder_hidden_states=context, **extra).sample
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        mean = ddpm_step(scheduler, out, t, x, torch.zeros_like(x))[0]
        std = step_std(scheduler, t)
        if std > 0 and (keep_last or i < steps - 1):
            noise[i] = ((xts[i + 1] - mean[0]) / std).to(noise.dtype)
        if callback is not None:
            callback(i, noise[i])
    return DDPMInversion(xts, noise, scheduler.timesteps.clone(), prompt, guidance)


@torch.no_grad()
def ddpm_generate(pipe, prompt: str, seed: int = 0, steps: int = 100, guidance: float = 3.5,
                  **pipe_kwargs) -> tuple[Image.Image, DDPMInversion]:
    """Generate an image with DDPM steps and keep its latents and noise maps: a ``DDPMInversion`` of it
    without inverting anything (replaying it with the same prompt and guidance gives the image again)."""
    generator = torch.Generator().manual_seed(seed)
    latents: list[torch.Tensor] = []

    def keep(pipeline, i, t, kwargs):
        latents.append(kwargs["latents"][0].detach().clone())
        return {}

    with replay_noise(pipe, [None], generator=generator) as scheduler, torch.inference_mode():
        x_t = pipe.prepare_latents(1, pipe.unet.config.in_channels, *_size(pipe, pipe_kwargs), pipe.unet.dtype,
                                   pipe.unet.device, generator)
        image = pipe(prompt, latents=x_t, num_inference_steps=steps, guidance_scale=guidance,
                     callback_on_step_end=keep, **pipe_kwargs).images[0]
    noise = torch.stack([z[0] for z in scheduler.drawn])
    inv = DDPMInversion(torch.stack([x_t[0].clone(), *latents]), noise, scheduler.timesteps.clone(), prompt, guidance)
    return image, inv


def _size(pipe, kwargs) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return kwargs.get("height") or side, kwargs.get("width") or side


class NoiseReplayScheduler:
    """A DDPM scheduler (DDIM, η = 1) for a stock pipeline whose steps use stored noise maps, one per batch row.

    ``noise[row]`` is (T − skip, C, h, w) for the steps that run, or None for fresh noise from
    ``generator``. ``skip`` drops the first steps of the T the pipeline asks for (the loop starts at
    timestep index ``skip``). Everything else is the wrapped ``DDIMScheduler``'s.
    """

    def __init__(self, config, noise: list[torch.Tensor | None], skip: int = 0,
                 generator: torch.Generator | None = None):
        self._inner = DDIMScheduler.from_config(config)
        self.noise = noise
        self.skip = skip
        self.generator = generator
        self.timesteps = None
        self.drawn: list[torch.Tensor] = []  # the noise of every step taken, (rows, C, h, w) each

    def __getattr__(self, name):  # config, init_noise_sigma, scale_model_input, order, ...
        return getattr(self.__dict__["_inner"], name)

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs) -> None:
        self._inner.set_timesteps(num_inference_steps, device=device)
        self.drawn = []
        if self.skip >= len(self._inner.timesteps):
            raise ValueError(f"cannot skip {self.skip} of {len(self._inner.timesteps)} steps")
        self.timesteps = self._inner.timesteps[self.skip :]

    def step(self, model_output, timestep, sample, eta: float = 1.0, generator=None, return_dict: bool = True,
             **kwargs):
        index = int((self.timesteps == timestep).nonzero()[0, 0])
        rows = []
        for row in range(sample.shape[0]):
            stored = self.noise[row] if row < len(self.noise) else None
            if stored is None:  # drawn on the CPU, so the generator's seed means the same on every device
                z = torch.randn(sample.shape[1:], generator=self.generator, dtype=torch.float32)
            elif index >= len(stored):
                raise ValueError(f"row {row} has {len(stored)} noise maps; step {index} needs one more")
            else:
                z = stored[index]
            rows.append(z.to(sample.device, sample.dtype))
        z = torch.stack(rows)
        self.drawn.append(z)
        prev, x0 = ddpm_step(self._inner, model_output, timestep, sample, z)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev,)


class replay_noise:  # noqa: N801 - a context manager used like a function
    """``with replay_noise(pipe, [noise_a, noise_b], skip=32): pipe(...)`` — DDPM steps with stored noise maps
    (see ``NoiseReplayScheduler``); the pipeline's scheduler is put back on exit."""

    def __init__(self, pipe, noise: list[torch.Tensor | None], skip: int = 0,
                 generator: torch.Generator | None = None):
        self.pipe = pipe
        self.scheduler = NoiseReplayScheduler(pipe.scheduler.config, noise, skip, generator)
        self._saved = None

    def __enter__(self) -> NoiseReplayScheduler:
        self._saved = self.pipe.scheduler
        self.pipe.scheduler = self.scheduler
        return self.scheduler

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self.pipe.scheduler = self._saved
            self._saved = None

"""Render recipes with a stock pipeline: one batched call for many AttnMod settings and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import torch

from .dit import denoiser
from .encoders import compose_encoders, text_encoders
from .modify import modify
from .recipe import Recipe


class NonFiniteImageError(ValueError):
    """An image came out NaN/inf, typically from an extreme multiplier in fp16."""


def check_batch(recipes: Sequence[Recipe]) -> None:
    shared = {(r.steps, r.guidance, r.width, r.height, r.scheduler, r.model) for r in recipes}
    if len(shared) != 1:
        raise ValueError("one batch must share steps, guidance, size, scheduler and model")


def render(pipe, recipes: Sequence[Recipe]) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for ``recipes`` in one pipeline call.

    Each image gets its own generator seeded with its recipe's seed, so a tile of a batch is the
    image a single run with the same recipe makes. Non-finite pixels are kept (check ``finite``).
    """
    check_batch(recipes)
    r0 = recipes[0]
    device = denoiser(pipe).device
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(r.seed) for r in recipes]
    with ExitStack() as stack:
        stack.enter_context(modify(pipe, [r.mods_dict for r in recipes]))
        if any(r.encoder_weights for r in recipes):
            n = len(text_encoders(pipe))
            stack.enter_context(compose_encoders(pipe, [r.encoder_weights or (1.0,) * n for r in recipes]))
        stack.enter_context(torch.inference_mode())
        out = pipe(
            prompt=[r.prompt for r in recipes],
            negative_prompt=[r.negative_prompt for r in recipes] if any(r.negative_prompt for r in recipes) else None,
            num_inference_steps=r0.steps,
            guidance_scale=r0.guidance,
            width=r0.width,
            height=r0.height,
            generator=generators,
            output_type="np",
        )
    return np.asarray(out.images, dtype=np.float32)


def finite(images: np.ndarray) -> np.ndarray:
    """(N,) bool: which images are entirely finite."""
    return np.isfinite(images.reshape(len(images), -1)).all(axis=1)


def generate(pipe, recipe: Recipe) -> np.ndarray:
    """One image (H, W, 3) for ``recipe``; raises ``NonFiniteImageError`` instead of a black image."""
    image = render(pipe, [recipe])[0]
    if not finite(image[None])[0]:
        raise NonFiniteImageError(f"the image came out non-finite (NaN/inf) for {describe(recipe)}")
    return image


def describe(recipe: Recipe, short: dict[str, str] | None = None) -> str:
    short = short or {}
    mods = " ".join(f"{short.get(n, n)}={s.to_text()}" for n, s in recipe.mods) or "no mods"
    return f"seed {recipe.seed}, {mods}, prompt {recipe.prompt!r}"

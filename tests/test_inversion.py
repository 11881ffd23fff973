import numpy as np
import pytest
import torch
from PIL import Image

from attnmod import load_pipeline
from attnmod.inversion.ddim import ddim_invert, encode_image, replay_reference
from attnmod.methods.style_aligned import style_aligned

PROMPT = "a large red circle in the center, on a plain white background, flat style"
STEPS = 20  # the embedded model's default step count


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def generate(pipe, prompt, **kw):
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=STEPS, guidance_scale=1.0, output_type="np", **kw).images


def test_round_trip_adds_little_to_the_autoencoders_own_error(toy):
    """Invert an image, regenerate from the inverted noise at guidance 1: the error beyond what the VAE
    alone loses is small (bound: 0.02 mean absolute error on [0, 1] pixels, a tenth of the gap between
    two different prompts' images; measured 0.006 beyond the VAE's 0.008 on the shipped model)."""
    image = generate(toy, PROMPT, generator=torch.Generator().manual_seed(0))[0]
    pil = Image.fromarray((image * 255).round().astype(np.uint8))
    trajectory = ddim_invert(toy, pil, PROMPT, steps=STEPS)
    assert len(trajectory) == STEPS + 1
    again = generate(toy, PROMPT, latents=trajectory[-1])[0]
    with torch.no_grad():
        decoded = toy.vae.decode(trajectory[0] / toy.vae.config.scaling_factor).sample[0]
    vae_only = (decoded.permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)
    target = np.asarray(pil, dtype=np.float32) / 255
    round_trip, vae_error = np.abs(again - target).mean(), np.abs(vae_only - target).mean()
    assert round_trip - vae_error < 0.02, (round_trip, vae_error)


def test_replayed_reference_slot_holds_the_real_image_while_targets_follow_it(toy):
    image = generate(toy, PROMPT, generator=torch.Generator().manual_seed(3))[0]
    pil = Image.fromarray((image * 255).round().astype(np.uint8))
    trajectory = ddim_invert(toy, pil, PROMPT, steps=STEPS)
    noise = torch.randn(1, *trajectory[-1].shape[1:], generator=torch.Generator().manual_seed(1))
    latents = torch.cat([trajectory[-1], noise])
    prompts = [PROMPT, "a small blue star on the left, on a plain white background, flat style"]
    replay = replay_reference(trajectory, 0)
    plain = generate(toy, prompts, latents=latents.clone(), callback_on_step_end=replay)
    with style_aligned(toy, images=2):
        shared = generate(toy, prompts, latents=latents.clone(), callback_on_step_end=replay)
    with torch.no_grad():
        decoded = toy.vae.decode(trajectory[0] / toy.vae.config.scaling_factor).sample[0]
    reconstruction = (decoded.permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)
    assert np.abs(shared[0] - reconstruction).max() < 1e-3  # the slot ends on the inverted clean latent
    assert np.abs(shared[1] - plain[1]).mean() > 1e-3  # the target attends to the replayed reference


def test_reference_image_of_the_wrong_size_is_refused_clearly(toy):
    with pytest.raises(ValueError, match="resize it first"):
        encode_image(toy, Image.new("RGB", (50, 40)))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_inversion_uses_the_pipelines_own_conditioning_on_both_topologies(name, request):
    from attnmod.inversion.ddim import unet_conditioning

    pipe = request.getfixturevalue(name)
    seen = {}
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.setdefault("kw", k) and None, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe("a red cat", negative_prompt="", num_inference_steps=1, guidance_scale=2.0, height=32, width=32,
                 output_type="latent")
    finally:
        h.remove()
    context, extra = unet_conditioning(pipe, "a red cat", cfg=True)
    assert torch.equal(context, seen["kw"]["encoder_hidden_states"])
    for key, value in extra.get("added_cond_kwargs", {}).items():
        assert torch.equal(value, seen["kw"]["added_cond_kwargs"][key]), key
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    trajectory = ddim_invert(pipe, image, "a red cat", steps=3, guidance=2.0)
    assert len(trajectory) == 4 and all(torch.isfinite(t).all() for t in trajectory)

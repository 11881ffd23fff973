import numpy as np
import pytest
import torch
from PIL import Image

from attnmod import load_pipeline
from attnmod.inversion.ddim import encode_image
from attnmod.inversion.ddpm import ddpm_invert, ddpm_scheduler, ddpm_step, replay_noise, step_std

PROMPT = "a large red circle in the center, on a striped blue background, flat style"


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def image_of(pipe, prompt, size=None, steps=4):
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=size, width=size,
                    generator=torch.Generator().manual_seed(0)).images[0]


def replay(pipe, inv, steps, guidance, skip=0, prompt=PROMPT, size=None):
    with replay_noise(pipe, [inv.noise[skip:]], skip=skip), torch.inference_mode():
        return pipe(prompt, latents=inv.latents[skip][None], num_inference_steps=steps, guidance_scale=guidance,
                    height=size, width=size, output_type="latent").images


def test_replay_reproduces_the_image_exactly_on_the_embedded_model(toy):
    """The replayed latent is the image's own VAE latent, so the image is the VAE round trip of the input."""
    image = image_of(toy, PROMPT)
    inv = ddpm_invert(toy, image, PROMPT, steps=20, guidance=3.5, generator=torch.Generator().manual_seed(1))
    assert inv.latents.shape[0] == 21 and inv.noise.shape[0] == 20 and torch.isfinite(inv.noise).all()
    with torch.no_grad():
        x0 = encode_image(toy, image)
    assert torch.equal(inv.latents[-1], x0[0])
    latent = replay(toy, inv, 20, 3.5)
    assert (latent[0] - x0[0]).abs().max() < 1e-4
    skipped = replay(toy, inv, 20, 3.5, skip=7)  # the last 13 steps, from the 7th noisy latent
    assert (skipped[0] - x0[0]).abs().max() < 1e-4
    assert type(toy.scheduler).__name__ == "DDIMScheduler"  # restored


def test_the_reference_zeroes_the_last_map_and_then_misses(toy):
    image = image_of(toy, PROMPT)
    inv = ddpm_invert(toy, image, PROMPT, steps=10, guidance=1.0, keep_last=False,
                      generator=torch.Generator().manual_seed(1))
    assert inv.noise[-1].abs().max() == 0 and inv.noise[-2].abs().max() > 0
    with torch.no_grad():
        x0 = encode_image(toy, image)[0]
    assert (replay(toy, inv, 10, 1.0)[0] - x0).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_replay_is_exact_on_sd15_and_sdxl_topologies(name, request):
    pipe = request.getfixturevalue(name)
    image = image_of(pipe, "a red cat", size=32)
    inv = ddpm_invert(pipe, image, "a red cat", steps=6, guidance=3.5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x0 = encode_image(pipe, image)[0]
    assert (replay(pipe, inv, 6, 3.5, prompt="a red cat", size=32)[0] - x0).abs().max() < 1e-4


def test_rows_without_stored_noise_draw_from_the_generator_and_the_pipeline_is_restored(sd):
    stock = sd.scheduler
    with torch.inference_mode():
        plain = sd("a red cat", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images

    def fresh(seed):
        with replay_noise(sd, [None], generator=torch.Generator().manual_seed(seed)), torch.inference_mode():
            return sd("a red cat", num_inference_steps=3, height=32, width=32, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images

    assert np.array_equal(fresh(5), fresh(5)) and not np.array_equal(fresh(5), fresh(6))
    assert sd.scheduler is stock
    with torch.inference_mode():
        again = sd("a red cat", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(plain, again)


def test_ddpm_step_at_a_zero_terminal_snr_first_step_is_finite(toy):
    """ᾱ_999 = 0: the direction's coefficient √(1 − ᾱ_prev − σ²) is 0 up to rounding (diffusers' DDIM step
    takes the root of a tiny negative number there and returns NaN)."""
    scheduler = ddpm_scheduler(toy)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    assert int(t) == 999 and float(scheduler.alphas_cumprod[999]) == 0.0
    x, v, z = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    prev, x0 = ddpm_step(scheduler, v, t, x, z)
    assert torch.isfinite(prev).all() and torch.allclose(x0, -v)  # v-prediction at ᾱ = 0: x̂_0 = −v
    abar_prev = float(scheduler.alphas_cumprod[979])
    assert torch.allclose(prev, abar_prev ** 0.5 * x0 + step_std(scheduler, t) * z, atol=1e-5)


def test_bad_replays(toy):
    image = image_of(toy, PROMPT)
    inv = ddpm_invert(toy, image, PROMPT, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="row 0 has 2 noise maps"), replay_noise(toy, [inv.noise[:2]]), \
            torch.inference_mode():
        toy(PROMPT, latents=inv.latents[0][None], num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    with pytest.raises(ValueError, match="cannot skip 4 of 4 steps"), replay_noise(toy, [inv.noise], skip=4), \
            torch.inference_mode():
        toy(PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    assert type(toy.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="resize it first"):
        ddpm_invert(toy, Image.new("RGB", (32, 32)), PROMPT, steps=4)


def test_a_generated_image_keeps_its_noise_and_needs_no_inversion(toy):
    from attnmod.inversion.ddpm import ddpm_generate

    image, inv = ddpm_generate(toy, PROMPT, seed=3, steps=12, guidance=3.0, output_type="np")
    assert inv.latents.shape[0] == 13 and inv.noise.shape[0] == 12 and inv.noise[-1].abs().max() > 0
    again = replay(toy, inv, 12, 3.0)
    assert torch.equal(again[0], inv.latents[-1])  # the same steps with the same noise: bit for bit
    image2, inv2 = ddpm_generate(toy, PROMPT, seed=3, steps=12, guidance=3.0, output_type="np")
    assert np.array_equal(image, image2) and torch.equal(inv.noise, inv2.noise)  # reproducible from the seed
    assert type(toy.scheduler).__name__ == "DDIMScheduler"

from dataclasses import replace

import pytest
import torch

from attnmod.toy.model import TINY
from attnmod.toy.train import TrainConfig, train


def test_resume_is_bit_exact(tmp_path):
    cfg = TrainConfig(model=TINY, vae_steps=2, vae_batch=2, cache_size=4, steps=3, batch=2, ckpt_every=1,
                      export_every=100, keep_every=0, decoder_steps=2)
    train(cfg, tmp_path / "a", export_to=None, progress=False)
    train(replace(cfg, steps=1, decoder_steps=0), tmp_path / "b", export_to=None, progress=False)  # "interrupted" in the UNet phase
    train(replace(cfg, decoder_steps=1), tmp_path / "b", export_to=None, progress=False)  # ... in the decoder phase
    train(cfg, tmp_path / "b", export_to=None, progress=False)  # resumed
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["dec_step"] == b["dec_step"] == 2
    for part in ("vae", "unet", "text_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["ema"]["unet"][k], b["ema"]["unet"][k]) for k in a["ema"]["unet"])
    assert torch.equal(a["rng"], b["rng"])


def test_export_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=2, steps=1, batch=2, keep_every=0,
                      decoder_steps=0)
    train(cfg, tmp_path / "w", export_to=tmp_path / "model", progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a small red star at the top", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)


def test_export_checkpoint_matches_training_export(tmp_path):
    from safetensors.torch import load_file

    from attnmod.toy.train import export_checkpoint

    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=2, steps=2, batch=2, keep_every=0,
                      decoder_steps=1)
    train(cfg, tmp_path / "w", export_to=tmp_path / "a", progress=False)
    assert export_checkpoint(tmp_path / "w", tmp_path / "b") == 2
    for part in ("unet", "vae", "text_encoder"):
        fa = next((tmp_path / "a" / part).glob("*.safetensors"))
        fb = next((tmp_path / "b" / part).glob("*.safetensors"))
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    ca, cb = (json.loads((tmp_path / d / "vae" / "config.json").read_text()) for d in ("a", "b"))
    assert ca["scaling_factor"] == cb["scaling_factor"] != 0.18215


def test_noise_schedule_switches_to_zero_terminal_snr(tmp_path):
    import json

    from attnmod.toy.train import export_checkpoint, scheduler_at

    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=2, steps=2, batch=2, keep_every=0,
                      zero_snr_from=1, decoder_steps=0)
    assert scheduler_at(cfg, 0).alphas_cumprod[-1] > 1e-3  # SD's schedule leaks signal at t=999
    assert scheduler_at(cfg, 1).alphas_cumprod[-1] < 1e-6  # pure noise at t=999
    train(cfg, tmp_path / "w", export_to=tmp_path / "a", progress=False)
    export_checkpoint(tmp_path / "w", tmp_path / "b")
    for folder in ("a", "b"):
        config = json.loads((tmp_path / folder / "scheduler" / "scheduler_config.json").read_text())
        assert config["rescale_betas_zero_snr"] is True
    late = replace(cfg, zero_snr_from=100)
    train(late, tmp_path / "w2", export_to=tmp_path / "c", progress=False)
    config = json.loads((tmp_path / "c" / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is False


def test_object_weights_cover_the_dilated_mask():
    from attnmod.toy.train import object_weights

    masks = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    masks[0, 0, 8, 8] = True
    w = object_weights(masks, 10.0)
    assert w.shape == (1, 1, 16, 16)
    assert w[0, 0, 6:11, 6:11].eq(10).all() and w.sum() == 25 * 10 + (256 - 25)


def test_decoder_phase_tunes_only_the_decoder(tmp_path):
    base = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=2, steps=1, batch=2, keep_every=0,
                       decoder_steps=0)
    train(base, tmp_path / "w", export_to=None, progress=False)
    before = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=False)
    cache = torch.load(tmp_path / "w" / "cache-2.pt", weights_only=False)
    train(replace(base, decoder_steps=2), tmp_path / "w", export_to=None, progress=False)
    after = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=False)
    assert after["phase"] == "decoder" and after["dec_step"] == 2
    enc = [k for k in before["vae"] if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before["vae"] if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(before["vae"][k], after["vae"][k]) for k in enc)  # the latent space is kept
    assert not all(torch.equal(before["vae"][k], after["vae"][k]) for k in dec)
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part])
    assert torch.equal(cache["latents"], torch.load(tmp_path / "w" / "cache-2.pt", weights_only=False)["latents"])
    with pytest.raises(ValueError, match="past the UNet phase"):
        train(replace(base, steps=2, decoder_steps=2), tmp_path / "w", export_to=None, progress=False)

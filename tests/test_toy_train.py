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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A TINY model trained for a step and exported: what a fine-tune starts from."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=2, steps=1, batch=2, keep_every=0,
                      decoder_steps=0)
    train(cfg, root / "w", export_to=root / "model", progress=False)
    return root / "model"


def _finetune_cfg(folder, **kw):
    from attnmod.toy.train import finetune_config

    base = {"model": TINY, "cache_size": 6, "steps": 3, "batch": 3, "ckpt_every": 1, "export_every": 100,
            "keep_every": 0, "warmup": 2, "probe_fit_steps": 1}
    return finetune_config(folder, **{**base, **kw})


def test_finetune_resume_is_bit_exact_and_keeps_the_vae(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    cfg = _finetune_cfg(tiny_folder)
    logs = []
    train(cfg, tmp_path / "a", export_to=tmp_path / "export", progress=False, callback=logs.append)
    assert all(k in logs[-1] for k in ("probe_loss", "grounding_loss"))  # the final phase's losses from step 0
    train(replace(cfg, steps=1), tmp_path / "b", export_to=None, progress=False)  # "interrupted"
    train(replace(cfg, steps=2), tmp_path / "b", export_to=None, progress=False)
    train(cfg, tmp_path / "b", export_to=None, progress=False)  # resumed
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["vae_step"] == 0 and a["phase"] == "unet"
    for part in ("unet", "text_encoder", "probe"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(a["ema"][part][k], b["ema"][part][k]) for k in a["ema"][part])
    assert torch.equal(a["rng"], b["rng"])
    # the folder's VAE is kept whole (no VAE or decoder phase) with its scaling factor, and the UNet moved
    start = {p: load_file(next((tiny_folder / p).glob("*.safetensors"))) for p in ("vae", "unet")}
    assert all(torch.equal(start["vae"][k], a["vae"][k]) for k in start["vae"])
    assert not all(torch.equal(start["unet"][k], a["unet"][k]) for k in start["unet"])
    import json

    scale = json.loads((tiny_folder / "vae" / "config.json").read_text())["scaling_factor"]
    assert a["scale"] == scale == json.loads((tmp_path / "export" / "vae" / "config.json").read_text())["scaling_factor"]
    out = load_file(next((tmp_path / "export" / "vae").glob("*.safetensors")))
    assert all(torch.equal(start["vae"][k], out[k]) for k in out)
    with pytest.raises(ValueError, match="fresh workdir"):  # a fine-tune never resumes a full run's workdir
        train(replace(cfg, finetune_from=None, layout_share=0.0, place_dropout=0.0, vae_steps=1, decoder_steps=0),
              tmp_path / "a", export_to=None, progress=False)


def test_finetune_cache_mixes_anchored_and_free_layouts(tmp_path, tiny_folder):
    from attnmod.toy import dataset

    cfg = _finetune_cfg(tiny_folder, cache_size=8, layout_share=0.5, steps=1)
    train(cfg, tmp_path / "w", export_to=None, progress=False)
    cache = torch.load(tmp_path / "w" / "cache-8-layout0.5.pt", weights_only=False)
    assert cache["kind"].tolist() == [0] * 4 + [1] * 4 and cache["ids"].shape[:2] == (8, 8)
    assert cache["masks"].shape == (8, dataset.MAX_OBJECTS, 16 * 16)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    for i, (kind, seed) in enumerate(zip(cache["kind"].tolist(), cache["seed"].tolist(), strict=True)):
        s = dataset.sample_layout(seed) if kind else dataset.sample(seed)
        assert int(cache["n_objects"][i]) == len(s.masks)
        pooled = cache["masks"][i].float().view(-1, 16, 16)
        blocks = torch.from_numpy(s.masks).float().view(len(s.masks), 16, 4, 16, 4).mean((2, 4))
        assert torch.equal(pooled[: len(s.masks)], blocks) and not pooled[len(s.masks):].any()
        no_place = tok.decode(cache["ids"][i, 4].tolist(), skip_special_tokens=True)
        assert no_place.replace(" ,", ",") == dataset.caption(s.scene, place=False)
        full = tok.decode(cache["ids"][i, 0].tolist(), skip_special_tokens=True).replace(" ,", ",")
        assert full == s.caption


def test_cli_finetune_exports_to_its_workdir(tmp_path):
    from attnmod.toy.cli import main
    from attnmod.toy.model import SHIPPED

    before = {p: p.stat().st_mtime_ns for p in SHIPPED.rglob("*")}
    assert main(["train-toy", "--finetune-from", str(SHIPPED), "--workdir", str(tmp_path / "w"), "--cache-size", "2",
                 "--steps", "1", "--batch", "2", "--layout-share", "0.5", "--place-dropout", "0.3", "--warmup", "1",
                 "--threads", "1", "--no-progress", "--log-every", "0"]) == 0
    state = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=False)
    tc = state["train_config"]
    assert (tc["finetune_from"], tc["layout_share"], tc["place_dropout"], tc["lr"]) == (str(SHIPPED), 0.5, 0.3, 2e-4)
    assert (tmp_path / "w" / "export" / "unet").is_dir()
    assert {p: p.stat().st_mtime_ns for p in SHIPPED.rglob("*")} == before  # the shipped model is untouched

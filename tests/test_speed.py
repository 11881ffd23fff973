"""Loading-side speed options: --compile, --offload, --vae-tiling (library and CLI)."""

import numpy as np
import pytest
import torch
from conftest import run

import attnmod.cli as cli
from attnmod import load_pipeline, speed
from attnmod.cli import main

NO_CUDA = not torch.cuda.is_available()


def test_flags_reach_the_pipeline():
    pipe = load_pipeline("tiny", device="cpu", compile="default", vae_tiling=True)
    assert pipe.vae.use_tiling
    assert speed.is_compiled(pipe.unet) and speed.scale_slots(pipe.unet) is not None
    plain = load_pipeline("tiny", device="cpu")
    assert not plain.vae.use_tiling and not speed.is_compiled(plain.unet)


def test_vae_tiling_is_exact_where_one_tile_covers_the_image_and_really_tiles_larger_ones():
    pipe = load_pipeline("tiny", device="cpu")
    stock32, stock64 = run(pipe, steps=2), run(pipe, steps=2, height=64, width=64)
    pipe.vae.enable_tiling()  # the tiny VAE's tiles are 32 px: one covers a 32x32 image
    assert np.array_equal(run(pipe, steps=2), stock32)
    tiled64 = run(pipe, steps=2, height=64, width=64)
    assert np.abs(tiled64 - stock64).max() > 0  # 64x64: four blended tiles (random VAE: seams differ)


def test_attnmod_maps_and_style_aligned_give_the_same_results_with_vae_tiling():
    """Where one tile covers the image (the tiny VAE's tiles are 32 px) tiling is exact for every attention tool."""
    from attnmod import modify
    from attnmod.maps import trace
    from attnmod.methods.style_aligned import style_aligned

    def tools(pipe):
        with modify(pipe, {"U1A1A2": (-5, 0.2), "M0A0A1": 3.0}):
            mod = run(pipe, steps=2)
        with trace(pipe) as tc:
            traced = run(pipe, steps=2)
        maps = tc.result("a red cat")
        with style_aligned(pipe, images=3):
            styled = run(pipe, prompt=["a red cat", "a blue dog", "a green star"], steps=2)
        return mod, traced, maps, styled

    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    plain = tools(pipe)
    pipe.vae.enable_tiling()
    tiled = tools(pipe)
    for a, b in ((plain[0], tiled[0]), (plain[1], tiled[1]), (plain[3], tiled[3])):
        assert np.array_equal(a, b)
    assert torch.equal(plain[2].cross, tiled[2].cross) and torch.equal(plain[2].self_maps, tiled[2].self_maps)
    assert not np.array_equal(plain[0], plain[1])  # AttnMod really changed the image


def test_cli_passes_the_flags_to_the_loader(monkeypatch, capsys):
    seen = {}

    def fake_load(model, **kw):
        seen.update(kw)
        return load_pipeline(model, **{k: v for k, v in kw.items() if k != "compile"})

    monkeypatch.setattr(cli, "load_pipeline", fake_load)
    assert main(["blocks", "--model", "tiny", "--device", "cpu", "--compile", "--vae-tiling"]) == 0
    assert seen["compile"] == "default" and seen["vae_tiling"] and seen["offload"] is None
    assert main(["blocks", "--model", "tiny", "--compile", "reduce-overhead"]) == 0
    assert seen["compile"] == "reduce-overhead"


@pytest.mark.parametrize("args, message", [
    (["--compile", "fast"], "unknown compile mode 'fast'; choose one of default, reduce-overhead, max-autotune"),
    (["--offload", "disk"], "unknown offload 'disk'; choose one of model, sequential"),
    (["--offload", "model", "--device", "cpu"], "--offload model needs a CUDA GPU"),
    (["--offload", "sequential", "--device", "cpu"], "--offload sequential needs a CUDA GPU"),
])
def test_bad_speed_options_are_one_line_errors_before_loading(args, message, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["blocks", "--model", "tiny", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_offload_without_a_gpu_says_it_needs_one():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_pipeline("tiny", offload="model")  # default device here: cpu


@pytest.mark.skipif(NO_CUDA, reason="model CPU offload needs a CUDA GPU")
def test_model_offload_gives_the_same_images_on_a_gpu():
    from attnmod import Schedule, modify

    plain = load_pipeline("tiny", device="cuda", dtype="fp32")
    offloaded = load_pipeline("tiny", device="cuda", dtype="fp32", offload="model")
    for pipe in (plain, offloaded):
        pipe.set_progress_bar_config(disable=True)
    assert np.allclose(run(plain), run(offloaded), atol=1e-5)
    with modify(plain, {"U1*": Schedule(-5, 0.5)}):
        a = run(plain)
    with modify(offloaded, {"U1*": Schedule(-5, 0.5)}):
        b = run(offloaded)
    assert np.allclose(a, b, atol=1e-5)


def test_ui_takes_the_flags_and_checks_them_first(monkeypatch, tmp_path, capsys):
    import attnmod.ui as ui

    seen = {}
    monkeypatch.setattr(ui, "require_gradio", lambda: None)
    monkeypatch.setattr(ui, "create", lambda *a, **k: seen.update(k) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        main(["ui", "--model", "tiny", "--out", str(tmp_path / "ui"), "--compile", "--vae-tiling"])
    assert seen["compile"] == "default" and seen["vae_tiling"] and seen["offload"] is None
    assert main(["ui", "--out", str(tmp_path / "ui2"), "--offload", "model", "--device", "cpu"]) != 0
    assert "--offload model needs a CUDA GPU" in capsys.readouterr().err

"""MultiDiffusion panoramas: windows, their averaging, one window = the stock pipeline, the style reference = its own
generation, chunked windows = all at once, processors restored, bad sizes."""

import json

import numpy as np
import pytest
import torch

from attnmod.methods.panorama import (
    PanoramaOptions,
    StyleRef,
    average_views,
    panorama,
    reference_weights,
    views,
)
from attnmod.tiny import tiny_sd15, tiny_sdxl


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    p = tiny_sd15() if request.param == "sd15" else tiny_sdxl()
    p.set_progress_bar_config(disable=True)
    return p


def _stock(pipe, prompt, seed):
    return pipe(prompt, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def test_views_hand_case_and_bad_widths():
    assert views(16, 48, (16, 16), 8) == [(0, 0, 16, 16), (0, 8, 16, 24), (0, 16, 16, 32), (0, 24, 16, 40),
                                          (0, 32, 16, 48)]
    assert views(24, 16, (16, 16), 8) == [(0, 0, 16, 16), (8, 0, 24, 16)]
    with pytest.raises(ValueError, match="latent width 44 must be the window's 16 plus a multiple of the stride 8"):
        views(16, 44, (16, 16), 8)
    with pytest.raises(ValueError, match="latent width 8"):
        views(16, 8, (16, 16), 8)


def test_average_views_hand_case():
    crops = [torch.full((1, 1, 1, 2), 1.0), torch.full((1, 1, 1, 2), 3.0)]
    out = average_views((1, 1, 1, 3), [(0, 0, 1, 2), (0, 1, 1, 3)], crops)
    assert out.flatten().tolist() == [1.0, 2.0, 3.0]  # the overlap is the mean of the two windows


def test_one_window_is_the_stock_pipeline(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    one = panorama(pipe, "a red cat", width=side, steps=3, guidance=7.5, seed=0)
    assert np.array_equal(one.image, _stock(pipe, "a red cat", 0))


def test_reference_is_its_own_generation_and_styles_the_panorama(pipe):
    before = dict(pipe.unet.attn_processors)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = side + 5 * 8 * pipe.vae_scale_factor  # 6 windows
    plain = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0)
    styled = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0,
                      references=[StyleRef("a blue dog", 5)])
    assert styled.image.shape == (side, width, 3) and len(styled.views) == 6
    assert np.abs(styled.references[0] - _stock(pipe, "a blue dog", 5)).max() < 1e-5  # it attends to itself only
    assert np.abs(styled.image - plain.image).max() > 1e-2
    for batch in (3, 4):  # chunks of windows (the last one shorter) = all at once, to batching noise (the GEMMs'
        # blocking depends on the batch size with several threads; bit-identical with one)
        chunked = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0,
                           references=[StyleRef("a blue dog", 5)], options=PanoramaOptions(view_batch=batch))
        assert np.abs(chunked.image - styled.image).max() < 1e-5
    assert np.abs(panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0,
                           options=PanoramaOptions(view_batch=4)).image - plain.image).max() < 1e-5
    assert dict(pipe.unet.attn_processors) == before


def test_bad_input(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with pytest.raises(ValueError, match="plus a multiple of the stride"):
        panorama(pipe, "a red cat", width=side + 4 * pipe.vae_scale_factor, steps=2)
    from PIL import Image

    with pytest.raises(ValueError, match="a reference image is 8x8; the panorama's windows are"):
        panorama(pipe, "a red cat", width=side, steps=2, references=[StyleRef("a dog", image=Image.new("RGB", (8, 8)))])
    with pytest.raises(ValueError, match="at most one per window"):
        panorama(pipe, "a red cat", width=side, steps=2, references=[StyleRef("a dog"), StyleRef("a cow")])


def test_reference_weights_hand_case():
    windows = [(0, left, 16, left + 16) for left in (0, 8, 16, 24, 32)]  # centres 8 .. 40
    w = reference_weights(windows, 2)
    assert w[:, 0].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and w.sum(1).tolist() == [1.0] * 5
    w3 = reference_weights(windows, 3)  # anchors at 8, 24, 40
    assert w3.tolist() == [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]
    assert reference_weights(windows, 1).tolist() == [[1.0]] * 5


def test_two_references_each_side_follows_its_own(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = side + 4 * 8 * pipe.vae_scale_factor  # 5 windows: the first is all left, the last all right
    refs = [StyleRef("a blue dog", 5), StyleRef("a green frog", 6)]
    two = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0, references=refs)
    left = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0, references=refs[:1])
    right = panorama(pipe, "a red cat", width=width, steps=3, guidance=7.5, seed=0, references=refs[1:])
    assert len(two.references) == 2
    assert np.abs(two.references[1] - _stock(pipe, "a green frog", 6)).max() < 1e-5
    edge = side // 4  # the outermost pixels: covered by the first (last) window alone
    assert np.abs(two.image[:, :edge] - left.image[:, :edge]).mean() < np.abs(
        two.image[:, :edge] - right.image[:, :edge]).mean()
    assert np.abs(two.image[:, -edge:] - right.image[:, -edge:]).mean() < np.abs(
        two.image[:, -edge:] - left.image[:, -edge:]).mean()


def test_cli_panorama_writes_and_remakes(sd_folder, tmp_path, capsys):
    from PIL import Image

    from attnmod.cli import main

    out = tmp_path / "p"
    args = ["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "64", "--steps", "2",
            "--style-prompt", "a blue dog", "--style-seed", "3", "--out", str(out), "--quiet"]
    assert main(args) == 0
    image = np.asarray(Image.open(out / "panorama.png"))
    assert image.shape == (32, 64, 3) and (out / "reference.png").exists()
    assert main(["panorama", "--recipe", str(out / "panorama.png"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "panorama.png")), image)
    two = ["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "64", "--steps", "2",
           "--style-prompt", "a blue dog", "--style-prompt", "a green frog", "--out", str(tmp_path / "two"), "--quiet"]
    assert main(two) == 0 and (tmp_path / "two" / "reference-1.png").exists()
    info = json.loads(Image.open(tmp_path / "two" / "panorama.png").text["attnmod_panorama"])
    assert info["style"] == [{"prompt": "a blue dog", "seed": 0}, {"prompt": "a green frog", "seed": 1}]
    code = main(["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "72", "--steps", "2",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "plus a multiple of the stride" in err and len(err.splitlines()) == 1
    assert main(["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "64",
                 "--style-ref", "x.png", "--out", str(tmp_path / "bad2")]) == 2
    assert "--style-ref-prompt" in capsys.readouterr().err


def test_one_window_with_a_negative_prompt_is_the_stock_pipeline(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    one = panorama(pipe, "a red cat", width=side, steps=3, guidance=7.5, seed=0, negative_prompt="a dog")
    stock = pipe("a red cat", negative_prompt="a dog", num_inference_steps=3, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.array_equal(one.image, stock)


def test_cli_panorama_style_options_are_kept_in_the_recipe(sd_folder, tmp_path, capsys):
    from PIL import Image

    from attnmod.cli import main

    base = ["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "64", "--steps", "2",
            "--style-prompt", "a blue dog", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 0
    assert main(base + ["--option", "query_chunk=4", "--out", str(tmp_path / "chunked")]) == 0
    whole, chunked = (np.asarray(Image.open(tmp_path / d / "panorama.png")).astype(int) for d in ("whole", "chunked"))
    assert np.abs(whole - chunked).max() <= 1  # exact up to float rounding
    info = json.loads(Image.open(tmp_path / "chunked" / "panorama.png").text["attnmod_panorama"])
    assert info["style_aligned"] == {"query_chunk": 4}
    assert main(base + ["--option", "adain_values=true", "--out", str(tmp_path / "values")]) == 0
    values = np.asarray(Image.open(tmp_path / "values" / "panorama.png"))
    assert np.abs(values.astype(int) - whole).max() > 2  # the option reached the shared attention
    assert main(["panorama", "--recipe", str(tmp_path / "values" / "panorama.png"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "panorama.png")), values)
    capsys.readouterr()
    assert main(["panorama", "--model", str(sd_folder), "--prompt", "a red cat", "--width", "64", "--option",
                 "query_chunk=4", "--out", str(tmp_path / "bad")]) == 2
    assert "give --style-prompt or --style-ref" in capsys.readouterr().err

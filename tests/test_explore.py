"""Encoder composition (SDXL), presets, the A/B/A+B sheet and the block influence map."""

import json

import numpy as np
import pytest
import torch
from conftest import hook_count, run

from attnmod import Recipe, Schedule, Sweep, generate, run_scan
from attnmod.cli import main
from attnmod.encoders import compose_encoders
from attnmod.influence import block_influence
from attnmod.presets import preset

XL = Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny-sdxl")


def unet_inputs(pipe, weights=None):
    seen = {}

    def grab(module, args, kwargs):
        seen["context"] = kwargs["encoder_hidden_states"].clone()
        seen["pooled"] = kwargs["added_cond_kwargs"]["text_embeds"].clone()

    h = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        if weights is None:
            run(pipe, steps=1, negative_prompt="a dog")
        else:
            with compose_encoders(pipe, weights):
                run(pipe, steps=1, negative_prompt="a dog")
    finally:
        h.remove()
    return seen


def test_encoder_weights_scale_each_encoders_part_and_its_pooled_embedding(sdxl):
    stock = unet_inputs(sdxl)
    hooks_before = hook_count(sdxl.text_encoder), hook_count(sdxl.text_encoder_2)  # transformers adds its own
    d1 = sdxl.text_encoder.config.hidden_size
    first_off = unet_inputs(sdxl, (0.0, 1.0))
    assert torch.all(first_off["context"][..., :d1] == 0)  # negative and positive halves alike
    assert torch.equal(first_off["context"][..., d1:], stock["context"][..., d1:])
    assert torch.equal(first_off["pooled"], stock["pooled"])  # pooled comes from encoder 2
    half_second = unet_inputs(sdxl, (1.0, 0.5))
    assert torch.allclose(half_second["context"][..., d1:], 0.5 * stock["context"][..., d1:])
    assert torch.allclose(half_second["pooled"], 0.5 * stock["pooled"])
    assert torch.equal(half_second["context"][..., :d1], stock["context"][..., :d1])
    assert (hook_count(sdxl.text_encoder), hook_count(sdxl.text_encoder_2)) == hooks_before
    with compose_encoders(sdxl, (1.0, 1.0)):
        assert np.array_equal(run(sdxl), run(sdxl))
    with pytest.raises(ValueError, match="one value per text encoder"):
        compose_encoders(sdxl, (1.0,))


def test_encoder_axis_batches_like_single_runs(sdxl):
    sweep = Sweep(prompts=("a red cat",), blocks=("U1A1T0A2",), encoder_weights=((0.5, 1.5), (1.0, 0.0)),
                  settings=(Schedule(-5, 0.2),))
    assert sweep.layout() == ("mod", "encoders", [])
    result = run_scan(sdxl, sweep, XL, batch_size=6, progress=False)
    assert len(result.tiles) == 2 * 3
    for tile in result.tiles:
        single = generate(sdxl, tile.recipe)
        assert np.abs(np.asarray(result.image(tile), dtype=np.float32) / 255 - single).max() <= 1e-3 + 1 / 255
    weighted = [t for t in result.tiles if t.recipe.encoder_weights == (1.0, 0.0)][0]
    assert "Text encoder weights: 1,0" in weighted.recipe.a1111_parameters()
    assert Recipe.from_dict(json.loads(json.dumps(weighted.recipe.to_dict()))) == weighted.recipe


def test_presets():
    zero = Sweep(prompts=("p",), settings=preset("zero-conditioning")["settings"])
    assert [s.to_text() for s in zero.axes()["mod"]] == ["1:0", "0:0"]  # the ablation tile beside the default
    assert preset("paper-scan")["rates"] == (-1.0, -0.5, 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_pair_sheet_and_zero_conditioning_cli(sd_folder, tmp_path, capsys):
    out = tmp_path / "pair"
    assert main(["scan", "--model", str(sd_folder), "--prompt", "a red cat", "--pair", "M0A0A1,M0A0A2",
                 "--start", "-5,5", "--rate", "0.5", "--steps", "2", "--size", "32x32", "--out", str(out),
                 "--quiet"]) == 0
    assert "x=start, y=rate, sheets by block" in capsys.readouterr().out
    row = out / "grid-side-by-side.png"
    singles = sorted(out.glob("grid-0*.png"))
    from PIL import Image

    assert len(singles) == 3 and Image.open(row).width > 3 * Image.open(singles[0]).width
    blocks = {t["coords"]["block"] for t in json.loads((out / "manifest.json").read_text())["tiles"]}
    assert blocks == {"M0A0A1", "M0A0A2", "M0A0A1+M0A0A2"}
    assert main(["scan", "--model", str(sd_folder), "--prompt", "a red cat", "--preset", "zero-conditioning",
                 "--steps", "2", "--size", "32x32", "--out", str(tmp_path / "zero"), "--quiet"]) == 0
    assert "scan: 2 tiles" in capsys.readouterr().out
    assert main(["scan", "--model", str(sd_folder), "--prompt", "p", "--pair", "M0A0A1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--pair expects two blocks" in capsys.readouterr().err


def test_influence_map_scores_every_block(sd, tmp_path):
    base = Recipe("a red cat", steps=2, guidance=5.0, width=32, height=32)
    result = block_influence(sd, base, Schedule(-5, 0.2), out=tmp_path, progress=False)
    assert len(result.scores) == 32
    ranking = result.ranking()
    assert ranking[0][1] >= ranking[-1][1] > 0
    top = ranking[0][0]
    tile = next(t for t in result.scan.tiles if t.coords["block"] == top and t.recipe.mods)
    default = next(t for t in result.scan.tiles if not t.recipe.mods)
    expected = np.abs(np.asarray(result.scan.image(tile), np.float32) - np.asarray(result.scan.image(default),
                                                                                   np.float32)).mean() / 255
    assert ranking[0][1] == pytest.approx(expected)
    saved = json.loads((tmp_path / "influence.json").read_text())
    assert saved["ranking"][0]["block"] == top and (tmp_path / "influence.png").exists()
    with pytest.raises(ValueError, match="changes something"):
        block_influence(sd, base, Schedule())


def test_strategy_and_influence_cli(sd_folder, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["strategy", "--model", str(sd_folder), "--prompt", "a red cat", "--blocks", "M0*", "--steps", "3",
                 "--size", "32x32", "--out", str(out)]) == 0
    assert "block gaining +1 at each step: M0A0A" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(out), "--out", str(again)]) == 0
    from PIL import Image

    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    assert main(["strategy", "--model", str(sd_folder), "--prompt", "p", "--picker", "loud", "--out", str(out)]) == 2
    assert "unknown picker 'loud'" in capsys.readouterr().err
    assert main(["influence", "--model", str(sd_folder), "--prompt", "a red cat", "--blocks", "M0*", "--steps", "2",
                 "--size", "32x32", "--out", str(tmp_path / "inf"), "--quiet"]) == 0
    assert "most influential at -5:0.2: M0A0A" in capsys.readouterr().out

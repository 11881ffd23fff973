"""Scans, influence map, greedy strategy, recipes, loading and the CLI on tiny SD3 and FLUX pipelines."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnmod import Recipe, Schedule, Sweep, generate, run_scan
from attnmod.blocks import resolve_blocks
from attnmod.cli import main
from attnmod.influence import block_influence
from attnmod.loading import checkpoint_kind, load_pipeline
from attnmod.strategy import run_strategy

BASES = {"sd3": Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny-sd3"),
         "flux": Recipe("a red cat", steps=3, guidance=3.5, width=32, height=32, model="tiny-flux")}


@pytest.mark.parametrize(("name", "block"), [("sd3", "J1I+J1T"), ("flux", "S0I")])
def test_scan_tiles_equal_single_runs_and_recipes_remake_them(name, block, request, tmp_path):
    pipe, base = request.getfixturevalue(name), BASES[name]
    sweep = Sweep(prompts=("a red cat",), seeds=(0, 1), blocks=(block,), starts=(-5.0, 4.0))
    result = run_scan(pipe, sweep, base, out=tmp_path, batch_size=6, progress=False)
    assert len(result.tiles) == 3 * 2 and not result.failed and (tmp_path / "grid.png").is_file()
    for tile in result.tiles:
        single = generate(pipe, tile.recipe)
        tiled = np.asarray(Image.open(tile.path), dtype=np.float32) / 255
        assert np.abs(tiled - single).max() <= 1e-5 + 1 / 255  # 8-bit rounding of the stored tile
        assert Recipe.from_png(tile.path) == tile.recipe
    names = {n for t in result.tiles for n, _ in t.recipe.mods}
    assert names == {b.name for b in resolve_blocks(pipe, block)}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_influence_map_scores_every_stream(name, request):
    pipe, base = request.getfixturevalue(name), BASES[name]
    result = block_influence(pipe, base, Schedule(-5.0, 0.2), blocks="all", batch_size=16, progress=False)
    shorts = [b.short for b in resolve_blocks(pipe, "all")]
    assert list(result.scores) == shorts and all(s >= 0 for s in result.scores.values())
    assert max(result.scores.values()) > 0.01
    sheet = result.sheet(tile_px=32)
    assert sheet.width > 32 * 3 and sheet.height > 32 * 2


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_greedy_strategy_runs_and_its_recipe_remakes_the_image(name, request):
    pipe, base = request.getfixturevalue(name), BASES[name]
    result = run_strategy(pipe, base, blocks="J*", picker="most")
    assert len(result.order) == base.steps and result.order[0] is not None
    assert np.abs(generate(pipe, result.recipe) - result.image).max() < 1e-5


def test_cli_blocks_generate_scan_on_dit(tmp_path, capsys):
    assert main(["blocks", "--model", "tiny-flux"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["J0I", "transformer_blocks.0.attn:image", "image"] and len(lines) == 7
    assert main(["blocks", "--model", "tiny-sd3", "--select", "J0"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.strip().splitlines()] == ["J0I", "J0T", "J0I2"]
    assert main(["blocks", "--model", "tiny-sd3", "--select", "J2T"]) == 2
    assert "block J2 has no text output" in capsys.readouterr().err
    out = tmp_path / "g.png"
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "a red cat", "--steps", "2",
                 "--mod", "J1=-3:0.5", "--out", str(out)]) == 0
    recipe = Recipe.from_png(out)
    assert dict(recipe.mods) == {"transformer_blocks.1.attn:image": Schedule(-3, 0.5),
                                 "transformer_blocks.1.attn:text": Schedule(-3, 0.5)}
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main(["scan", "--model", "tiny-flux", "--prompt", "a red cat", "--steps", "2", "--start", "-3,3",
                 "--out", str(tmp_path / "scan"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "scan" / "manifest.json").read_text())
    assert {t["coords"]["block"] for t in manifest["tiles"]} == {"J1I"}  # the default block: the middle one
    assert len(manifest["tiles"]) == 3 and (tmp_path / "scan" / "grid.png").is_file()


def test_dit_folders_load_and_single_files_are_routed(sd3, flux, tmp_path):
    from safetensors.torch import save_file

    for name, pipe in (("sd3", sd3), ("flux", flux)):
        pipe.save_pretrained(tmp_path / name, safe_serialization=True)
        loaded = load_pipeline(str(tmp_path / name), device="cpu")
        assert type(loaded) is type(pipe)
        for a, b in zip(loaded.transformer.parameters(), pipe.transformer.parameters(), strict=True):
            assert torch.equal(a, b)
    keys = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "sdxl": "conditioner.embedders.1.model.ln_final.weight", "sd": "model.diffusion_model.input_blocks.0.0.weight"}
    for kind, key in keys.items():
        save_file({key: torch.zeros(1)}, tmp_path / f"{kind}.safetensors")
        assert checkpoint_kind(tmp_path / f"{kind}.safetensors") == kind


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_unet_only_methods_say_so_on_dit(name, request):
    from attnmod.inversion.ddim import ddim_invert
    from attnmod.inversion.ddpm import ddpm_invert
    from attnmod.methods.bounded import Subject, bounded
    from attnmod.methods.p2p import edit
    from attnmod.methods.panorama import panorama
    from attnmod.methods.style_aligned import style_aligned
    from attnmod.methods.transfer import transfer

    pipe = request.getfixturevalue(name)
    image = Image.new("RGB", (32, 32))
    calls = {"StyleAligned": lambda: style_aligned(pipe, images=2),
             "Prompt-to-Prompt": lambda: edit(pipe, "a red cat", "a blue cat"),
             "Cross-Image Attention": lambda: transfer(pipe, image, image),
             "Bounded Attention": lambda: bounded(pipe, "a red cat", [Subject("cat", (0, 0, 0.5, 0.5))]),
             "MultiDiffusion": lambda: panorama(pipe, "a red cat", width=64),
             "DDIM inversion": lambda: ddim_invert(pipe, image, "a red cat"),
             "DDPM inversion": lambda: ddpm_invert(pipe, image)}
    for method, call in calls.items():
        with pytest.raises(ValueError, match=f"{method}.* works on UNet models .*this model is a DiT transformer"):
            call()


def test_cli_unet_only_command_on_dit_is_one_line(tmp_path, capsys):
    code = main(["edit", "--model", "tiny-sd3", "--prompt", "a red cat", "--to", "a blue cat", "--steps", "2",
                 "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Prompt-to-Prompt works on UNet models" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())

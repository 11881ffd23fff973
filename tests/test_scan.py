import json

import numpy as np
import pytest
from PIL import Image

import attnmod.sweep as scan_mod
from attnmod import Recipe, Schedule, Sweep, generate, run_scan
from attnmod.generate import NonFiniteImageError
from attnmod.grid import FRAME
from attnmod.modify import normalize_mods
from attnmod.sweep import parse_values

BASE = Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny")


def test_parse_values():
    assert parse_values("-20:50:8") == [-20, -10, 0, 10, 20, 30, 40, 50]
    assert parse_values("-1:1:5") == [-1, -0.5, 0, 0.5, 1]
    assert parse_values("-20,-5,1,10") == [-20, -5, 1, 10]
    assert parse_values("0:3:4", int) == [0, 1, 2, 3]
    assert parse_values("7") == [7]
    for bad in ("1:2", "a:b:3", "1:2:0", "", "1,,x", "1:2:3:4"):
        with pytest.raises(ValueError, match="malformed range"):
            parse_values(bad)


def test_axes_always_include_the_default_and_lay_out_like_the_paper():
    sweep = Sweep(prompts=("p",), starts=(-20.0, 50.0), rates=(-1.0, 1.0))
    axes = sweep.axes()
    assert axes["start"] == [-20, 1, 50] and axes["rate"] == [-1, 0, 1]
    assert sweep.layout() == ("start", "rate", [])
    fig4 = Sweep(prompts=("p",), seeds=(0, 1, 2), settings=(Schedule(-5, 0.2), Schedule(10, -0.5)))
    assert fig4.axes()["mod"][0] == Schedule()  # the default output is the leftmost column
    assert fig4.layout() == ("mod", "seed", [])
    fig5 = Sweep(prompts=("p, van gogh", "p, ukiyo-e"), settings=(Schedule(-5, 0.2),))
    assert fig5.layout() == ("mod", "prompt", [])
    sheets = Sweep(prompts=("p",), blocks=("U1A1A2", "M0A0A1+M0A0A2"), starts=(-5.0,), rates=(0.5,))
    assert sheets.layout() == ("start", "rate", ["block"])
    with pytest.raises(ValueError, match="unknown axis"):
        Sweep(prompts=("p",), x="colour")
    with pytest.raises(ValueError, match="prompt"):
        Sweep(prompts=())


def test_batched_tiles_equal_single_runs(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), seeds=(0, 1), starts=(-5.0, 4.0), rates=(0.5,))
    result = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=5, progress=False)
    assert len(result.tiles) == 3 * 2 * 2 and not result.failed
    for tile in result.tiles[::3]:
        single = generate(sd, tile.recipe)
        tiled = np.asarray(Image.open(tile.path), dtype=np.float32) / 255
        assert np.abs(tiled - single).max() < 1e-3 + 1 / 255  # 8-bit rounding of the stored tile
        assert np.abs(np.asarray(result.image(tile), dtype=np.float32) / 255 - single).max() <= 1 / 255


def test_output_folder_recipes_and_manifest(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), blocks=("U1A1A2", "M0A0A1+M0A0A2"), starts=(-5.0,), rates=(0.5,))
    result = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=8, progress=False)
    assert [p.name for p in result.sheet_files] == ["grid-00-block_U1A1A2.png", "grid-01-block_M0A0A1_M0A0A2.png"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["tiles"]) == 2 * 2 * 2
    assert all(t["status"] == "done" for t in manifest["tiles"])
    # the default tile is one image shared by both sheets
    assert len({t["file"] for t in manifest["tiles"]}) == 1 + 3 * 2
    together = [t for t in result.tiles if t.coords["block"] == "M0A0A1+M0A0A2" and t.recipe.mods]
    assert len(together[0].recipe.mods) == 2
    with Image.open(together[0].path) as im:
        assert "AttnMod: \"M0A0A1=" in im.text["parameters"] and "Seed: 0" in im.text["parameters"]
    assert Recipe.from_png(together[0].path) == together[0].recipe
    grid = Image.open(result.sheet_files[0])
    assert grid.width > 2 * 128 and grid.height > 2 * 128


def test_default_tile_is_framed(sd):
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0,), rates=(0.5,))
    result = run_scan(sd, sweep, BASE, progress=False, tile_px=128)
    fixed, rows = result.sheets()[0]
    default = [(r, c) for r, row in enumerate(rows) for c, t in enumerate(row) if not t.recipe.mods]
    assert default == [(0, 1)]  # columns start [-5, 1], rows rate [0, 0.5]
    grid = np.asarray(result.grid())
    red = np.all(grid == FRAME, axis=-1)
    ys, xs = np.nonzero(red)
    assert 4 * 124 * 4 <= red.sum() <= 4 * 128 * 4  # one 4-px frame around one 128-px tile
    assert xs.max() - xs.min() == ys.max() - ys.min() == 127


def test_resume_renders_only_missing_tiles_and_never_rewrites_finished_ones(sd, tmp_path, monkeypatch):
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0, 3.0, 8.0), rates=(0.5,))  # 4 x 2 = 8 tiles

    def interrupt(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scan(sd, sweep, BASE, out=tmp_path, batch_size=3, progress=interrupt)
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiles").glob("*.png")}
    assert len(finished) == 3
    assert not list(tmp_path.glob("tiles/.*.tmp"))  # nothing half-written

    rendered = []
    real_render = scan_mod.render
    monkeypatch.setattr(scan_mod, "render", lambda pipe, recipes: rendered.extend(recipes) or real_render(pipe, recipes))
    result = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=3, progress=False)
    assert len(rendered) == 5 and result.pending_count == 5
    assert {r.key for r in rendered}.isdisjoint(p.stem for p in finished)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    again = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=3, progress=False)
    assert again.pending_count == 0 and len(rendered) == 5


def test_non_finite_tiles_are_reported_not_written(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), blocks=("all",), starts=(1e30,), rates=(0.0,))
    result = run_scan(sd, sweep, BASE, out=tmp_path, progress=False)
    [bad] = result.failed
    assert bad.recipe.mods and not bad.path.exists()
    assert [t.status for t in result.tiles].count("done") == 1
    assert result.sheet_files[0].exists()  # the sheet shows a crossed placeholder for it
    with pytest.raises(NonFiniteImageError, match="seed 0"):
        generate(sd, bad.recipe)


def test_recipe_regenerates_the_same_image(sd, tmp_path):
    recipe = BASE.with_mods(normalize_mods(sd.unet, {"U1A1A2": Schedule(-5, 0.2, 0.01)}))
    first = generate(sd, recipe)
    from attnmod.recipe import save_png

    path = save_png(first, tmp_path / "x.png", recipe)
    assert np.array_equal(generate(sd, Recipe.from_png(path)), first)
    with pytest.raises(ValueError, match="multiple of 8"):
        Recipe("p", width=30, height=32)


def test_python_api_scan_returns_images_and_grid(sd):
    import attnmod

    result = attnmod.scan(sd, "a red cat", blocks=["U1A1A2"], starts=[-5, 10], rates=[0.5], steps=2, size=32)
    assert len(result.images) == 3 * 2 and all(im.size == (32, 32) for im in result.images)
    assert result.grid().width >= 3 * 128


def test_more_than_two_axes_make_one_sheet_per_value(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat", "a blue dog"), seeds=(0, 1), starts=(-5.0,), rates=(0.5,))
    assert sweep.layout() == ("start", "rate", ["seed", "prompt"])
    result = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=16, progress=False)
    names = [p.name for p in result.sheet_files]
    assert len(names) == 4 and names[0].startswith("grid-00-seed_0-prompt_a_red_cat")
    for fixed, rows in result.sheets():
        assert all(t.recipe.seed == fixed["seed"] and t.recipe.prompt == fixed["prompt"] for row in rows for t in row)
    fig4 = Sweep(prompts=("a red cat",), seeds=(0, 1, 2), settings=(Schedule(-5, 0.2),), x="seed", y="mod")
    assert fig4.layout() == ("seed", "mod", [])

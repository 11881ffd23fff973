"""fp16 overflow: the fp32 redo of an overflowing UNet call, the stock fp16 path everywhere else, and tiles that
still overflow named (status, manifest, error), never written as good.

The tiny model's activations are small (no multiplier up to 30,000 overflows it in fp16), so ``loud`` scales one
block's output projection by 1000: then multiplier 100 overflows fp16 at U1A1A2 and 30 does not.
"""

import json

import numpy as np
import pytest
import torch
from conftest import run

from attnmod import Recipe, Schedule, Sweep, generate, load_pipeline, modify, render, run_scan
from attnmod.cli import main
from attnmod.generate import NonFiniteImageError, finite
from attnmod.influence import block_influence
from attnmod.modify import fp32_fallback

LOUD = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # U1A1A2
BASE = Recipe("a red cat", steps=2, width=32, height=32, guidance=5.0, model="tiny")
OVER, UNDER = 100.0, 30.0  # multipliers of U1A1A2 that do / do not overflow the loud tiny model in fp16


def loud(dtype):
    pipe = load_pipeline("tiny", device="cpu", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.get_submodule(LOUD).to_out[0].weight.mul_(1000)
    return pipe


@pytest.fixture(scope="module")
def p16():
    return loud(torch.float16)


@pytest.fixture(scope="module")
def p32():
    return loud(torch.float32)


def mods(m):
    return BASE.with_mods({LOUD: Schedule(m)})


def test_overflow_is_redone_in_fp32_finite_and_close_to_the_fp32_image(p16, p32):
    with fp32_fallback(False):
        assert not finite(render(p16, [mods(OVER)])).any()  # stock fp16 overflows
    weights = {k: v.clone() for k, v in p16.unet.state_dict().items()}
    image = generate(p16, mods(OVER))  # the fallback is on by default
    reference = render(p32, [mods(OVER)])[0]
    stock_gap = np.abs(render(p16, [BASE])[0] - render(p32, [BASE])[0]).max()  # fp16 vs fp32 without AttnMod
    assert np.isfinite(image).all()
    assert np.abs(image - reference).max() <= max(0.02, 5 * stock_gap)
    after = p16.unet.state_dict()  # the weights went up to fp32 for the redo and came back bit for bit
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in weights.items())
    with modify(p16, {LOUD: OVER}) as ctl:
        run(p16, steps=2)
    assert ctl.overflows and all(o["rescued"] for o in ctl.overflows)
    assert {o["step"] for o in ctl.overflows} <= {0, 1}


def test_neutral_and_below_threshold_keep_the_stock_path_bit_for_bit(p16, p32):
    for pipe in (p16, p32):
        stock = run(pipe, steps=2)
        with modify(pipe, {"all": 1.0}) as ctl:
            assert np.array_equal(run(pipe, steps=2), stock)
        assert not ctl.overflows
    with fp32_fallback(False), modify(p16, {LOUD: UNDER}):
        plain = run(p16, steps=2)
    with modify(p16, {LOUD: UNDER}) as ctl:  # fallback on, nothing overflows: never redone
        assert np.array_equal(run(p16, steps=2), plain)
    assert not ctl.overflows
    with fp32_fallback(False):  # fp32 never checks: the same image either way
        off = render(p32, [mods(OVER)])
    assert np.array_equal(render(p32, [mods(OVER)]), off)


def test_scan_names_the_overflowing_tile_and_does_not_write_it(p16, tmp_path):
    sweep = Sweep(prompts=("a red cat",), blocks=("U1A1A2",), starts=(UNDER, OVER))
    with fp32_fallback(False):
        result = run_scan(p16, sweep, BASE, out=tmp_path, progress=False)
    [bad] = result.failed
    assert bad.coords["start"] == OVER and bad.status == "nonfinite" and not bad.path.exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    status = {t["coords"]["start"]: t["status"] for t in manifest["tiles"]}
    assert status == {1.0: "done", UNDER: "done", OVER: "nonfinite"}
    with fp32_fallback(False), pytest.raises(NonFiniteImageError, match="=100"):
        generate(p16, bad.recipe)
    rescued = run_scan(p16, sweep, BASE, out=tmp_path / "fallback", progress=False)
    assert not rescued.failed and all(t.path.exists() for t in rescued.tiles)


def test_beyond_what_fp32_saves_the_tile_is_named(p16, tmp_path, monkeypatch, capsys):
    """A multiplier above fp16's range is inf in the fp16 table: the fp32 redo cannot save it either."""
    import attnmod.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: p16)
    code = main(["scan", "--model", "tiny", "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
                 "--block", "U1A1A2", "--start", f"{UNDER:g},1e5", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "1 tile(s) came out non-finite" in err and "U1A1A2=100000" in err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["coords"]["start"] for t in manifest["tiles"] if t["status"] == "nonfinite"] == [1e5]
    with modify(p16, {LOUD: 1e5}) as ctl:
        run(p16, steps=2)
    assert ctl.overflows and not any(o["rescued"] for o in ctl.overflows)


def test_influence_map_reports_the_overflowing_block(p16):
    with fp32_fallback(False):
        result = block_influence(p16, BASE, Schedule(OVER), blocks="U1A1*", progress=False)
    assert np.isnan(result.scores["U1A1A2"]) and np.isfinite(result.scores["U1A1A1"])
    assert [t.coords["block"] for t in result.scan.failed] == ["U1A1A2"]


def test_word_maps_count_each_step_once_when_a_step_is_redone_in_fp32(p16, monkeypatch):
    from attnmod.maps import trace

    calls, real = [], trace._on_cross
    monkeypatch.setattr(trace, "_on_cross", lambda self, call, probs: calls.append(call.name) or real(self, call, probs))
    with modify(p16, {LOUD: OVER}) as ctl, trace(p16, self_attention=False) as maps:
        run(p16, steps=2)
    assert ctl.overflows  # the redo happened
    assert len(calls) == 2 * len(maps._cross_names)  # 2 steps x every cross layer, not the redone calls' too

import json

import numpy as np
import pytest
import torch

from attnmod.attention import AttentionCall
from attnmod.methods.p2p import (
    EditOptions,
    PromptToPrompt,
    blend_mask,
    cross_replace_count,
    edit,
    self_replace_count,
    token_mapping,
)

KW = dict(seed=0, steps=4, guidance=5.0, width=32, height=32)


def plain(pipe, prompt):
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, width=32, height=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


def test_with_nothing_replaced_both_images_equal_plain_generation(sd):
    result = edit(sd, "a red cat", "a red dog", options=EditOptions(0.0, 0.0), **KW)
    assert np.abs(result.source - plain(sd, "a red cat")).max() < 1e-5
    assert np.abs(result.edited - plain(sd, "a red dog")).max() < 1e-5


def test_hook_replaces_aligned_cross_maps_and_self_maps_in_the_window(sd):
    p2p = PromptToPrompt(sd, "a red cat", "a red cat with a dog", EditOptions(0.5, 0.25), "refine")
    p2p.start(4)  # cross: int(0.5 * 5) = 2 steps; self: int(0.25 * 4) = 1 step
    probs = torch.rand(4, 2, 16, 16)  # (uncond src, uncond edit, cond src, cond edit), h, Nq, tokens
    sd._guidance_scale = 5.0  # as inside a CFG pipeline call
    p2p.set_step(1)
    out = p2p(AttentionCall("x", True, 2, (4, 16, 32)), probs)
    assert torch.equal(out[:3], probs[:3])  # unconditional half and the source untouched
    assert torch.equal(out[3, ..., :4], probs[2, ..., :4])  # start, a, red, cat: the source's maps
    assert torch.equal(out[3, ..., 4:7], probs[3, ..., 4:7])  # with, a, dog: added words keep theirs
    p2p.set_step(2)  # past int(0.5 * (4 + 1)) = 2 steps: no cross replacement
    assert torch.equal(p2p(AttentionCall("x", True, 2, (4, 16, 32)), probs)[3], probs[3])
    self_probs = torch.rand(4, 2, 16, 16)
    p2p.set_step(0)
    assert torch.equal(p2p(AttentionCall("x", False, 2, (4, 16, 32)), self_probs)[3], self_probs[2])
    p2p.set_step(1)  # past int(0.25 * 4) = 1 step: the edit's own maps
    assert torch.equal(p2p(AttentionCall("x", False, 2, (4, 16, 32)), self_probs)[3], self_probs[3])
    assert p2p.wants(AttentionCall("x", False, 2, (4, 16, 32)))  # a layer it replaces: asked at every step
    assert not p2p.wants(AttentionCall("x", False, 2, (4, 1024, 32)))  # above self_max_patches: never
    p2p.start(2)  # int(0.25 * 2) = 0 steps: self-attention never replaced, the fused kernel runs
    assert not p2p.wants(AttentionCall("x", False, 2, (4, 16, 32)))


def test_token_mapping():
    from attnmod.tiny import _tokenizer

    tok = _tokenizer()
    refine = token_mapping(tok, "a red cat", "a red cat with a dog", "refine")
    assert refine[:8] == [0, 1, 2, 3, None, None, None, 4]  # the end tokens align (source's at 4)
    assert refine[8:] == list(range(8, 16))  # after the edit's end token, position k copies the source's k
    fewer = token_mapping(tok, "a red cat with a dog", "a red cat", "refine")
    assert fewer[:5] == [0, 1, 2, 3, 7] and fewer[5:] == list(range(5, 16))
    assert token_mapping(tok, "a red cat", "a blue cat", "swap")[:4] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="use refinement"):
        token_mapping(tok, "a red cat", "a red cat and dog", "swap")


def test_replace_windows_follow_the_reference_rounding():
    """google/prompt-to-prompt: cross maps for int(f * (T + 1)) steps (its alpha table has T + 1 rows), self maps
    for int(f * T) steps."""
    assert cross_replace_count(0.8, 6) == 5 and self_replace_count(0.4, 6) == 2  # int(5.6), int(2.4)
    assert cross_replace_count(0.8, 50) == 40 and self_replace_count(0.4, 50) == 20
    assert cross_replace_count(0.5, 4) == 2 and cross_replace_count(1.0, 6) == 7  # 1.0: every step
    assert cross_replace_count(0.0, 6) == 0 and self_replace_count(0.3, 3) == 0


def test_hook_windows_at_six_steps(sd):
    p2p = PromptToPrompt(sd, "a red cat", "a blue cat", EditOptions(0.8, 0.4), "swap")
    p2p.start(6)
    sd._guidance_scale = 5.0
    cross, self_ = AttentionCall("x", True, 2, (4, 16, 32)), AttentionCall("x", False, 2, (4, 16, 32))
    probs = torch.rand(4, 2, 16, 16)
    replaced = []
    for step in range(6):
        p2p.set_step(step)
        replaced.append((torch.equal(p2p(cross, probs)[3], probs[2]), torch.equal(p2p(self_, probs)[3], probs[2])))
    assert [c for c, _ in replaced] == [True] * 5 + [False]
    assert [s for _, s in replaced] == [True, True, False, False, False, False]


def test_self_maps_are_replaced_only_in_layers_of_at_most_16x16_patches(sd):
    sd._guidance_scale = 5.0
    for limit, replaced in ((None, [True, False]), (32 * 32, [True, True])):
        options = EditOptions(0.8, 0.4) if limit is None else EditOptions(0.8, 0.4, self_max_patches=limit)
        p2p = PromptToPrompt(sd, "a red cat", "a blue cat", options, "swap")
        p2p.start(4)
        p2p.set_step(0)
        got = [p2p.wants(AttentionCall("x", False, 2, (4, n, 32))) for n in (16 * 16, 32 * 32)]
        assert got == replaced, (limit, got)


def test_reweighting_acts_only_inside_the_cross_replace_window(sd):
    sd._guidance_scale = 5.0
    call, probs = AttentionCall("x", True, 2, (4, 16, 32)), torch.rand(4, 2, 16, 16)
    for every_step in (False, True):
        p2p = PromptToPrompt(sd, "a red cat", "a red cat", EditOptions(0.5, 0.0, reweight={"red": 2.0},
                                                                       reweight_every_step=every_step), "swap")
        p2p.start(4)  # window: int(0.5 * 5) = 2 steps
        w = torch.ones(16)
        w[2] = 2.0
        p2p.set_step(0)  # inside: the source's maps times the equalizer (both rules)
        assert torch.allclose(p2p(call, probs)[3], probs[2] * w)
        p2p.set_step(3)  # outside: the reference leaves the edit's own maps; the named departure re-weights them
        assert torch.allclose(p2p(call, probs)[3], probs[3] * w if every_step else probs[3])


def test_reweighting_changes_the_edit_monotonically(sd):
    change = {}
    for factor in (1.0, 2.0, 4.0):
        result = edit(sd, "a red cat", "a red cat", options=EditOptions(1.0, 0.0, reweight={"red": factor}), **KW)
        change[factor] = float(np.abs(result.edited - result.source).mean())
    assert change[1.0] == 0 and 0 < change[2.0] < change[4.0]
    nothing = edit(sd, "a red cat", "a red cat", options=EditOptions(0.0, 0.0, reweight={"red": 4.0}), **KW)
    assert np.array_equal(nothing.edited, nothing.source)  # the reference: no window, no re-weighting
    every = edit(sd, "a red cat", "a red cat", options=EditOptions(0.0, 0.0, reweight={"red": 4.0},
                                                                   reweight_every_step=True), **KW)
    assert np.abs(every.edited - every.source).mean() > 1e-3


def test_blend_mask_pools_upsamples_normalises_each_image_and_joins():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 10.0  # the source's blend word, strong
    maps[1, 3, 3] = 1.0  # the edit's, ten times weaker: normalised on its own it still counts
    maps[1, 0, 3] = 0.2  # below 0.3 of the edit's maximum even after pooling
    mask = blend_mask(maps, (8, 8), 0.3)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True  # 3x3 max pool: (0..1, 0..1), nearest x2: rows/cols 0..3
    expected[4:, 4:] = True  # (2..3, 2..3) -> 4..7
    assert torch.equal(mask, expected)
    assert not blend_mask(torch.zeros(2, 4, 4), (8, 8), 0.3).any()  # no blend word in either prompt


def test_local_blend_reads_the_cross_layers_at_a_quarter_of_the_latent(sd):
    from attnmod.blocks import short_name

    p2p = PromptToPrompt(sd, "a red cat", "a red dog", EditOptions(local_blend=("cat", "dog")), "swap")
    # SD1.5 at 512 px: the 16x16 layers of a 64x64 latent, down_blocks.2 and up_blocks.1 (the reference's
    # down_cross[2:4] + up_cross[:3])
    assert sorted(short_name(n) for n in p2p.blend_layers) == ["D2A0A2", "D2A1A2", "U1A0A2", "U1A1A2", "U1A2A2"]
    with pytest.raises(ValueError, match="1/16 of the latent side .* are at 1/1, 1/2, 1/4, 1/8"):
        PromptToPrompt(sd, "a red cat", "a red dog", EditOptions(local_blend=("dog",), blend_downsample=16), "swap")


def test_local_blend_accumulates_the_edits_replaced_maps_over_steps(sd):
    sd._guidance_scale = 5.0
    p2p = PromptToPrompt(sd, "a red cat", "a red dog", EditOptions(0.5, 0.0, local_blend=("cat", "dog")), "swap")
    p2p.start(4)
    p2p.latent_hw = (16, 16)
    layer = sorted(p2p.blend_layers)[0]
    call, probs = AttentionCall(layer, True, 2, (4, 16, 32)), torch.rand(4, 2, 16, 16)  # 4x4 patches
    p2p.set_step(0)  # in the window: the edit's "dog" map is the source's "cat" map
    p2p(call, probs)
    assert torch.allclose(p2p.blend_maps[1], p2p.blend_maps[0])
    first = p2p.blend_maps.clone()
    p2p.set_step(3)  # out of the window: the edit's own map, added to what the steps so far gave
    p2p(call, probs)
    assert torch.allclose(p2p.blend_maps[0], 2 * first[0])
    assert torch.allclose(p2p.blend_maps[1], first[1] + probs[3, ..., 3].sum(0).view(4, 4))


def test_edit_words_split_into_several_tokens(sd):
    p2p = PromptToPrompt(sd, "a red zebra", "a red zebra", EditOptions({"default_": 0.8, "zebra": 0.2},
                                                                       reweight={"zebra": 2.0}), "swap")
    assert p2p.weights[3:8].eq(2.0).all() and p2p.weights[1].item() == 1.0  # every piece of z e b r a</w>
    assert torch.allclose(p2p.cross_limit()[3:8], torch.tensor(0.2)) and p2p.cross_limit()[1].item() == pytest.approx(0.8)


def test_bad_edit_input(sd):
    with pytest.raises(ValueError, match="not in the edited prompt .*a red dog"):
        edit(sd, "a red cat", "a red dog", options=EditOptions(reweight={"blue": 2.0}), **KW)
    with pytest.raises(ValueError, match="fractions"):
        EditOptions(cross_replace_steps=1.5)
    with pytest.raises(ValueError, match="names 'cat', which is not in the edited prompt .*a red dog"):
        edit(sd, "a red cat", "a red dog", options=EditOptions({"default_": 0.8, "cat": 0.2}), **KW)
    with pytest.raises(ValueError, match="unknown edit mode"):
        edit(sd, "a red cat", "a red dog", mode="paint", **KW)


def test_edit_cli(sd_folder, tmp_path, capsys):
    from attnmod.cli import main

    out = tmp_path / "edit"
    assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--to", "a red dog", "--steps", "3",
                 "--size", "32x32", "--reweight", "red=2", "--blend", "dog", "--out", str(out)]) == 0
    assert all((out / n).exists() for n in ("source.png", "edit.png", "side-by-side.png"))
    from PIL import Image

    from attnmod.recipe import Recipe

    assert Recipe.from_png(out / "source.png").prompt == "a red cat"
    assert Recipe.from_png(out / "edit.png").prompt == "a red dog"
    info = json.loads(Image.open(out / "edit.png").text["attnmod_edit"])
    assert info["options"]["reweight"] == {"red": 2.0} and info["options"]["local_blend"] == ["dog"]
    again = tmp_path / "again"
    assert main(["edit", "--recipe", str(out / "edit.png"), "--out", str(again)]) == 0  # model from the recipe
    for name in ("source.png", "edit.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name))), name
    from attnmod.cli import _cross_replace

    assert _cross_replace([]) == 0.8 and _cross_replace(["0.5"]) == 0.5
    assert _cross_replace(["0.6", "dog=0.2"]) == {"default_": 0.6, "dog": 0.2}
    with pytest.raises(ValueError, match="WORD=FRACTION"):
        _cross_replace(["dog=lots"])
    per_word = tmp_path / "per-word"
    assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--to", "a red dog", "--steps", "3",
                 "--size", "32x32", "--cross-replace", "dog=0.2", "--out", str(per_word)]) == 0
    options = json.loads(Image.open(per_word / "edit.png").text["attnmod_edit"])["options"]
    assert options["cross_replace_steps"] == {"default_": 0.8, "dog": 0.2}
    tuned = tmp_path / "tuned"
    assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--to", "a red dog", "--steps", "3",
                 "--size", "32x32", "--blend", "dog", "--option", "blend_downsample=2", "--option",
                 "reweight-every-step=yes", "--out", str(tuned)]) == 0
    options = json.loads(Image.open(tuned / "edit.png").text["attnmod_edit"])["options"]
    assert options["blend_downsample"] == 2 and options["reweight_every_step"] is True
    for bad, says in ((["--option", "blend_downsample=0"], "blend_downsample is a factor >= 1"),
                      (["--option", "blend_downsample=half"], "blend_downsample takes an integer"),
                      (["--option", "reweight=2"], "NAME one of self_replace_steps, self_max_patches")):
        assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--to", "a red dog",
                     *bad, "--out", str(tmp_path / "never")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--out", str(tmp_path / "x")]) == 2
    assert "give --prompt and --to" in capsys.readouterr().err
    assert main(["edit", "--recipe", str(out / "side-by-side.png"), "--out", str(tmp_path / "y")]) == 2
    assert "not written by attnmod edit" in capsys.readouterr().err
    assert main(["edit", "--model", str(sd_folder), "--prompt", "a red cat", "--to", "a red cat and a dog",
                 "--steps", "2", "--size", "32x32", "--out", str(tmp_path / "bad")]) == 2
    assert "refinement" in capsys.readouterr().err


def test_local_blend_keeps_the_source_outside_the_words_region(sd):
    nothing = EditOptions(0.0, 0.0, local_blend=("cat", "dog"), blend_threshold=1.01)  # empty region
    everything = EditOptions(0.0, 0.0, local_blend=("cat", "dog"), blend_threshold=-1.0)  # whole image
    kept = edit(sd, "a red cat", "a red dog", options=nothing, **KW)
    assert np.abs(kept.edited - kept.source).max() < 1e-5
    free = edit(sd, "a red cat", "a red dog", options=everything, **KW)
    assert np.abs(free.edited - plain(sd, "a red dog")).max() < 1e-5
    # the random tiny model's maps are nearly flat: only a high threshold leaves part of the latent to the source
    half = edit(sd, "a red cat", "a red dog", options=EditOptions(0.0, 0.0, local_blend=("dog",), blend_threshold=0.98),
                **KW)
    assert len(half.blend_share) == 4 and all(0 < share < 1 for share in half.blend_share), half.blend_share
    unblended = edit(sd, "a red cat", "a red dog", options=EditOptions(0.0, 0.0), **KW)
    assert np.abs(half.edited - half.source).mean() < 0.9 * np.abs(unblended.edited - unblended.source).mean()
    assert free.blend_share == (1.0,) * 4 and kept.blend_share == (0.0,) * 4
    assert edit(sd, "a red cat", "a red dog", **KW).blend_share == ()  # no blend
    with pytest.raises(ValueError, match="in neither prompt"):
        edit(sd, "a red cat", "a red dog", options=EditOptions(local_blend=("bird",)), **KW)


@pytest.mark.parametrize("color, shape", [("red", "circle"), ("green", "star")])
def test_reweighting_a_colour_word_sets_its_strength_on_the_embedded_model(color, shape):
    """On the shipped model x0 weakens the colour and x4 strengthens it, with the reference's rule (inside the 0.8
    window, the prompt edited against itself) and more strongly with the every-step departure (maps_eval part 4)."""
    from attnmod import load_pipeline
    from attnmod.toy.evaluate import colour_amount

    pipe = load_pipeline("toy", device="cpu")
    prompt = f"a large {color} {shape} in the center, on a plain white background, flat style"
    rules = {"reference": lambda f: EditOptions(reweight={color: f}),
             "every step": lambda f: EditOptions(0.0, 0.0, reweight={color: f}, reweight_every_step=True)}
    amount = {name: [colour_amount(edit(pipe, prompt, prompt, seed=0, steps=8, guidance=3.0, width=64, height=64,
                                        options=make(f)).edited, color) for f in (0.0, 1.0, 4.0)]
              for name, make in rules.items()}
    ref, every = amount["reference"], amount["every step"]
    assert ref[0] < 0.95 * ref[1] and ref[2] > 1.15 * ref[1], amount
    assert every[0] < 0.9 * every[1] and every[2] > 1.3 * every[1], amount
    assert every[2] - every[0] > ref[2] - ref[0], amount

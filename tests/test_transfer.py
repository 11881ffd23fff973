import numpy as np
import pytest
import torch

from attnmod import Schedule, modify
from attnmod.attention import AttentionCall
from attnmod.blocks import short_name
from attnmod.inversion.ddpm import ddpm_invert
from attnmod.methods.transfer import (
    CrossImageAttention,
    TransferOptions,
    attention_step,
    contrast,
    latent_adain,
    swap_guidance_scales,
    swap_layers,
    transfer,
)

SMALL = dict(steps=8, skip=2, windows=((1, 8), (1, 5)), adain_steps=(2, 8), segments=3, noun="cat",
             prompt="a photo of a cat")


def image(pipe, prompt, seed):
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=3, height=32, width=32,
                    generator=torch.Generator().manual_seed(seed)).images[0]


def test_contrast_is_the_references_clipped_stretch():
    probs = torch.tensor([[0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])
    out = contrast(probs, 1.67)  # mean of every row is 1/3
    expected = ((probs - 1 / 3) * 1.67 + 1 / 3).clamp(0, 1)
    assert torch.allclose(out, expected) and out[0, 0] == 0  # 0.1 -> -0.056: clipped, not renormalised
    assert not torch.allclose(out.sum(-1), torch.ones(2))
    assert torch.allclose(contrast(probs, 1.67, renormalize=True).sum(-1), torch.ones(2))


def test_schedules_of_the_reference():
    s = swap_guidance_scales(3.5, 68)
    assert s[0] == 3.5 and s[-1] == 1.75 and len(s) == 68 and np.all(np.diff(s) < 0)
    assert swap_guidance_scales(1.5, 4)[-1] == 1.0  # never below 1
    assert [attention_step(i) for i in range(4)] == [0, 0, 1, 2]  # the previous callback's step


def test_latent_adain_matches_statistics_and_keeps_what_the_mask_leaves_out():
    content, style = torch.randn(4, 8, 8), torch.randn(4, 8, 8) * 3 + 2
    out = latent_adain(content, style)
    assert torch.allclose(out.mean((1, 2)), style.mean((1, 2)), atol=1e-4)
    assert torch.allclose(out.flatten(1).std(1), style.flatten(1).std(1), atol=1e-3)
    mask = torch.zeros(8, 8)
    mask[:4] = 1
    masked = latent_adain(content, style, mask, mask)
    assert torch.equal(masked[:, 4:], content[:, 4:])
    assert torch.allclose(masked[:, :4].flatten(1).mean(1), style[:, :4].flatten(1).mean(1), atol=1e-4)


def test_swap_layers_are_the_decoders_two_largest_self_attention_resolutions(sd, sdxl):
    sd15 = {short_name(n): w for n, w in swap_layers(sd.unet).items()}
    assert sd15 == {"U3A0A1": 0, "U3A1A1": 0, "U3A2A1": 0, "U2A0A1": 1, "U2A1A1": 1, "U2A2A1": 1}
    xl = swap_layers(sdxl.unet)
    assert len(xl) == 2 * 3 + 3 * 3 and all(".attn1" in n and n.startswith("up_blocks") for n in xl)
    assert {w for n, w in xl.items() if n.startswith("up_blocks.1.")} == {0}  # SDXL's largest: up_blocks.1
    assert set(swap_layers(sd.unet, "D0*")) == {b for b in swap_layers(sd.unet, "D0*")} and \
        all(".attn1" in n for n in swap_layers(sd.unet, "D0*"))
    with pytest.raises(ValueError, match="no self-attention blocks"):
        swap_layers(sd.unet, "cross")


def test_hook_swaps_the_output_row_of_the_second_half_only(sd):
    o = TransferOptions()
    layer = next(iter(swap_layers(sd.unet)))
    hooks = CrossImageAttention(sd, {layer: 0}, o)
    sd._guidance_scale = 3.5  # as inside a pipeline call with swap guidance
    q, k, v = (torch.randn(6, 2, 16, 8) for _ in range(3))  # [out, app, struct] x (no swap, swap)
    call = AttentionCall(layer, False, 2, (6, 16, 16))
    for step, source in ((12, 1), (16, 2), (41, 1), (46, 1)):  # attention step 15 (every 5th, < 40): structure
        hooks.clock.step = step
        _, k2, v2, _ = hooks.qkv(call, q, k, v)
        assert torch.equal(k2[3], k[3 + source]) and torch.equal(v2[3], v[3 + source]), step
        assert torch.equal(k2[:3], k[:3]) and torch.equal(k2[4:], k[4:])
    hooks.clock.step = 10  # attention step 9: before the window
    assert not hooks.swaps(call) and torch.equal(hooks.qkv(call, q, k, v)[1], k)
    hooks.clock.step = 11
    probs = torch.softmax(torch.randn(6, 2, 16, 16), -1)
    out = hooks.probs(call, probs.clone())  # the hook works in place on the probabilities it is given
    assert torch.equal(out[[0, 1, 2, 4, 5]], probs[[0, 1, 2, 4, 5]])
    assert torch.allclose(out[3], contrast(probs[3], 1.67))


def test_with_nothing_swapped_the_output_is_the_structures_replay(sd):
    a, b = image(sd, "a red cat", 0), image(sd, "a blue dog", 1)
    neutral = TransferOptions(**{**SMALL, "windows": ((0, 0),), "adain": "off"})
    r = transfer(sd, a, b, neutral)
    assert np.abs(r.output - r.structure).max() < 1e-5  # the same row twice (batch-position rounding only)
    swapped = transfer(sd, a, b, TransferOptions(**{**SMALL, "adain": "off"}))
    # the swap changes the output row only (the other rows round differently through the explicit softmax)
    assert np.abs(swapped.structure - r.structure).max() < 1e-5
    assert np.abs(swapped.appearance - r.appearance).max() < 1e-5
    assert np.abs(swapped.output - r.output).mean() > 1e-3


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_transfer_runs_restores_the_pipeline_and_falls_back_without_a_mask(name, request):
    pipe = request.getfixturevalue(name)
    a, b = image(pipe, "a red cat", 0), image(pipe, "a blue dog", 1)
    with torch.inference_mode():
        stock = pipe("a red cat", num_inference_steps=3, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    processors, scheduler = dict(pipe.unet.attn_processors), pipe.scheduler
    r = transfer(pipe, a, b, TransferOptions(**SMALL))
    assert r.output.shape == (32, 32, 3) and np.isfinite(r.output).all()
    # a random model's maps are flat: no segment is the cat's; AdaIN then covers the whole latent, and says so
    assert r.notes and "AdaIN over the whole latent" in r.notes[0]
    plain = transfer(pipe, a, b, TransferOptions(**{**SMALL, "adain": "plain"}))
    assert np.abs(plain.output - r.output).max() < 1e-5  # (the masked run's map capture rounds differently)
    assert pipe.scheduler is scheduler and dict(pipe.unet.attn_processors) == processors
    with torch.inference_mode():
        again = pipe("a red cat", num_inference_steps=3, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(stock, again)


def test_transfer_with_attnmod_active_and_with_given_inversions(sd):
    a, b = image(sd, "a red cat", 0), image(sd, "a blue dog", 1)
    o = TransferOptions(**{**SMALL, "adain": "off"})
    inv = [ddpm_invert(sd, im, o.text, steps=o.steps, guidance=o.inversion_guidance,
                       generator=torch.Generator().manual_seed(o.seed)) for im in (a, b)]
    base = transfer(sd, a, b, o)
    assert np.array_equal(transfer(sd, inv[0], inv[1], o).output, base.output)  # the same inversions
    with modify(sd, {"U1A1A2": Schedule(-5, 0.2)}):
        modded = transfer(sd, inv[0], inv[1], o)
    assert np.abs(modded.output - base.output).mean() > 1e-3 and np.isfinite(modded.output).all()


def test_bad_transfer_options(sd):
    a = image(sd, "a red cat", 0)
    with pytest.raises(ValueError, match="noun 'dog' is not in the prompt 'a photo of a cat'"):
        transfer(sd, a, a, TransferOptions(**{**SMALL, "noun": "dog"}))
    for bad, says in (({"adain": "maybe"}, "masked, plain or off"), ({"skip": 8}, "skip must be in"),
                      ({"swap_guidance": 0.5}, "swap_guidance must be >= 1")):
        with pytest.raises(ValueError, match=says):
            TransferOptions(**{**SMALL, **bad})
    with pytest.raises(ValueError, match="resize it first"):
        transfer(sd, a, a.resize((16, 16)), TransferOptions(**SMALL))


def test_transfer_cli_writes_the_set_and_remakes_it(tmp_path, capsys):
    from PIL import Image

    from attnmod.cli import main
    from attnmod.recipe import Recipe
    from attnmod.tiny import tiny_sd15

    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    image(pipe, "a red cat", 0).save(tmp_path / "s.png")
    image(pipe, "a blue dog", 1).save(tmp_path / "a.png")
    out = tmp_path / "t"
    fast = ["--option", "steps=16", "--option", "skip=2", "--option", "segments=3"]
    assert main(["transfer", "--model", "tiny", "--structure", str(tmp_path / "s.png"), "--appearance",
                 str(tmp_path / "a.png"), "--noun", "cat", *fast, "--out", str(out)]) == 0
    assert "side-by-side.png (structure | appearance | output)" in capsys.readouterr().out
    assert all((out / n).exists() for n in ("output.png", "structure.png", "appearance.png", "side-by-side.png"))
    import json

    info = json.loads(Image.open(out / "output.png").text["attnmod_transfer"])
    assert info["options"]["steps"] == 16 and info["options"]["noun"] == "cat" and info["image"] == "output"
    assert Recipe.from_png(out / "output.png").prompt == "a photo of a cat"
    again = tmp_path / "again"
    assert main(["transfer", "--recipe", str(out / "output.png"), "--out", str(again)]) == 0
    for name in ("output.png", "structure.png", "appearance.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name))), name
    Image.new("RGB", (48, 48)).save(tmp_path / "big.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for args, says in ((["--structure", str(tmp_path / "nope.png")], "--structure"),
                       (["--structure", str(tmp_path / "junk.png")], "cannot read the image"),
                       (["--structure", str(tmp_path / "big.png")], "is 48x48; this model makes 32x32 images"),
                       (["--option", "colour=1"], "bad option 'colour=1'"),
                       (["--noun", "cat", "--prompt", "a red dog"], "noun 'cat' is not in the prompt 'a red dog'")):
        argv = ["transfer", "--model", "tiny", "--structure", str(tmp_path / "s.png"), "--appearance",
                str(tmp_path / "a.png"), *fast, "--out", str(tmp_path / "bad")]
        flag = args[0]
        if flag in argv:  # replace the value of a flag given twice
            i = argv.index(flag)
            argv[i + 1] = args[1]
            args = args[2:]
        assert main([*argv[:-2], *args, *argv[-2:]]) == 2, args
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_transfer_on_the_embedded_model_takes_the_appearance_background():
    """A short run of the measured setting (benchmarks/transfer_eval.py): the output's background is the
    appearance's colour, where the structure's reconstruction keeps its own."""
    from attnmod import load_pipeline
    from attnmod.toy import dataset
    from attnmod.toy.evaluate import _NAMES, border_colours, label_pixels

    pipe = load_pipeline("toy", device="cpu")
    structure = dataset.render(dataset.parse_caption(
        "a large red circle on the left, on a plain white background, flat style"))[0]
    appearance = dataset.render(dataset.parse_caption(
        "a large blue square on the right, on a plain yellow background, flat style"))[0]
    from PIL import Image

    r = transfer(pipe, Image.fromarray(structure), Image.fromarray(appearance),
                 TransferOptions(prompt="", adain="plain", steps=30, skip=10, windows=((3, 30), (3, 21)),
                                 adain_steps=(6, 30)))

    def border(image):
        return _NAMES[border_colours(label_pixels((image * 255).round().astype(np.uint8)))[0]]

    assert border(r.structure) == "white" and border(r.output) == "yellow"


def test_transfer_cli_generates_inputs_from_prompts_without_inversion(tmp_path, capsys):
    import json

    from PIL import Image

    from attnmod.cli import main

    out = tmp_path / "g"
    fast = ["--option", "steps=16", "--option", "skip=2"]
    assert main(["transfer", "--model", "tiny", "--structure-prompt", "a red cat", "--structure-seed", "3",
                 "--appearance-prompt", "a blue dog", "--noun", "cat", *fast, "--out", str(out)]) == 0
    info = json.loads(Image.open(out / "output.png").text["attnmod_transfer"])
    assert info["structure"] == {"prompt": "a red cat", "seed": 3} and info["appearance"]["prompt"] == "a blue dog"
    again = tmp_path / "again"
    assert main(["transfer", "--recipe", str(out / "structure.png"), "--out", str(again)]) == 0
    for name in ("output.png", "structure.png", "appearance.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name))), name
    capsys.readouterr()
    for args in (["--appearance-prompt", "a blue dog"],
                 ["--structure", str(out / "output.png"), "--structure-prompt", "a red cat",
                  "--appearance-prompt", "a blue dog"]):
        assert main(["transfer", "--model", "tiny", *args, "--out", str(tmp_path / "bad")]) == 2
        assert "give --structure IMAGE or --structure-prompt PROMPT (one of them)" in capsys.readouterr().err


def test_reference_object_mask_rule_on_hand_made_maps():
    """Segments whose mean word map, scaled (m - |min|) / max, exceeds 1.4x the mean of the other segments' means
    (the highest left out) are the object's: means 1.0 (centre), 0.3 (top row), 0.2 (bottom row), 0 (the rest)
    give the threshold 1.4 * (0.3 + 0.2 + 0) / 3 = 0.233, so the centre and the top row."""
    from attnmod.maps import AttentionMaps
    from attnmod.segment import reference_object_mask

    h = w = 4
    group = torch.zeros(h * w, dtype=torch.long)
    group[[5, 6, 9, 10]], group[[0, 1, 2, 3]], group[[12, 13, 14, 15]] = 1, 2, 3
    self_maps = (group[:, None] == group[None, :]).float()[None]  # (1, 16, 16): same-group patches attend
    cross = torch.zeros(1, h, w, 4)  # tokens: <start>, a, cat, <end>
    cross[0, 1:3, 1:3, 2], cross[0, 0, :, 2], cross[0, 3, :, 2] = 1.0, 0.3, 0.2
    tokens = [["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]]
    maps = AttentionMaps(cross, self_maps, (h, w), tokens)
    mask = reference_object_mask(maps, "cat", k=4)
    assert mask.view(-1).nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 6, 9, 10]
    flat = AttentionMaps(torch.ones(1, h, w, 4), self_maps, (h, w), tokens)
    assert not reference_object_mask(flat, "cat", k=4).any()  # nothing stands out: empty (callers fall back)
    with pytest.raises(ValueError, match="mask is reference or word"):
        TransferOptions(mask="colour")


def test_swap_guidance_one_runs_the_swap_pass_alone(sd):
    """s = 1: no guidance batch at all (the reference uses the swap pass's prediction alone); the swap still acts."""
    a, b = image(sd, "a red cat", 0), image(sd, "a blue dog", 1)
    one = transfer(sd, a, b, TransferOptions(**{**SMALL, "adain": "off", "swap_guidance": 1.0}))
    neutral = transfer(sd, a, b, TransferOptions(**{**SMALL, "adain": "off", "swap_guidance": 1.0,
                                                    "windows": ((0, 0),)}))
    assert np.abs(neutral.output - neutral.structure).max() < 1e-5
    assert np.abs(one.output - neutral.output).mean() > 1e-3

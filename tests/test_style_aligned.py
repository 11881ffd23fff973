import numpy as np
import pytest
import torch

from attnmod import Schedule, modify
from attnmod.style_aligned import StyleAlignedOptions, adain, calc_mean_std, style_aligned

PROMPTS = ["a red cat", "a blue dog", "a green star"]


def batch(pipe, **kw):
    with torch.inference_mode():
        return pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np",
                    generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **kw).images


def test_adain_of_a_batch_against_itself_is_the_identity_with_several_heads():
    x = torch.randn(3, 4, 16, 8)  # (B, heads, tokens, channels)
    assert torch.allclose(adain(x, x), x, atol=1e-5)
    y = adain(x, torch.randn(3, 4, 10, 8) * 3 + 2)
    mean, std = calc_mean_std(y)
    assert mean.shape == std.shape == (3, 4, 1, 8)


def test_adain_matches_reference_statistics():
    x, ref = torch.randn(2, 2, 32, 4), torch.randn(2, 2, 32, 4) * 5 - 1
    out_mean, out_std = calc_mean_std(adain(x, ref))
    ref_mean, ref_std = calc_mean_std(ref)
    assert torch.allclose(out_mean, ref_mean, atol=1e-4) and torch.allclose(out_std, ref_std, atol=1e-3)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_sharing_disabled_is_bit_identical_and_restores(name, request):
    pipe = request.getfixturevalue(name)
    stock = batch(pipe)
    off = StyleAlignedOptions(share_attention=False, adain_queries=False, adain_keys=False, share_group_norm=False)
    with style_aligned(pipe, images=3, options=off):
        assert np.array_equal(batch(pipe), stock)
    with style_aligned(pipe, images=3):
        shared = batch(pipe)
    assert np.array_equal(batch(pipe), stock)
    assert np.abs(shared[0] - stock[0]).max() < 1e-4  # the reference is never changed
    assert np.abs(shared[1:] - stock[1:]).max() > 1e-3  # the targets are


def test_explicit_reference_index_and_options(sd):
    stock = batch(sd)
    for options in (StyleAlignedOptions(reference=2), StyleAlignedOptions(reference=2, full_attention_share=True,
                                                                         adain_values=True, shared_score_shift=1.0)):
        with style_aligned(sd, images=3, options=options):
            out = batch(sd)
        assert np.abs(out[2] - stock[2]).max() < 1e-4 and np.abs(out[0] - stock[0]).max() > 1e-3
    with pytest.raises(ValueError, match="reference index 3"):
        style_aligned(sd, images=3, options=StyleAlignedOptions(reference=3))
    with pytest.raises(ValueError, match="no self-attention blocks"):
        style_aligned(sd, images=3, options=StyleAlignedOptions(blocks="cross"))
    half = style_aligned(sd, images=3, options=StyleAlignedOptions(only_self_level=0.5))
    assert len(half.layers) == 8  # half of the 16 self-attention layers stay unshared


def test_works_together_with_attnmod(sd):
    stock = batch(sd)
    with style_aligned(sd, images=3), modify(sd, [{"U1A1A2": Schedule(-5, 0.2)}, {}, {}]):
        both = batch(sd)
    with modify(sd, [{"U1A1A2": Schedule(-5, 0.2)}, {}, {}]):
        modded = batch(sd)
    assert np.abs(both[0] - modded[0]).max() < 1e-4  # the reference: its AttnMod schedule, unshared
    assert np.abs(both[1:] - stock[1:]).max() > 1e-3


def test_style_cli_generated_and_real_reference(tmp_path, capsys):
    import json

    from PIL import Image

    from attnmod.cli import main

    out = tmp_path / "set"
    args = ["style", "--prompt", "a large red circle on the left", "--prompt", "a small blue star on the right",
            "--style", "on a striped yellow background, outlined style", "--steps", "4", "--out", str(out)]
    assert main(args) == 0
    assert (out / "grid.png").exists() and (out / "01.png").exists()
    info = json.loads(Image.open(out / "01.png").text["attnmod_style"])
    assert info["index"] == 1 and info["style_aligned"]["adain_queries"] is True
    assert info["style_aligned"]["adain_values"] is False  # published default
    tuned = tmp_path / "tuned"
    assert main([*args[:-1], str(tuned), "--option", "adain_values=true", "--option", "shared_score_shift=0.5"]) == 0
    info = json.loads(Image.open(tuned / "01.png").text["attnmod_style"])["style_aligned"]
    assert info["adain_values"] is True and info["shared_score_shift"] == 0.5
    assert main([*args[:-1], str(tmp_path / "z"), "--option", "adain_value=true"]) == 2
    assert "NAME one of share_attention, adain_queries" in capsys.readouterr().err
    ref = out / "00.png"
    real = tmp_path / "real"
    assert main(["style", "--prompt", "a small green square at the top", "--ref-image", str(ref), "--ref-prompt",
                 "a large red circle on the left, on a striped yellow background, outlined style", "--steps", "4",
                 "--out", str(real)]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    Image.new("RGB", (50, 40)).save(bad)
    assert main(["style", "--prompt", "a small green square at the top", "--ref-image", str(bad), "--ref-prompt",
                 "a large red circle on the left", "--out", str(tmp_path / "x")]) == 2
    assert "resize it first" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"nope")
    assert main(["style", "--prompt", "a small green square at the top", "--ref-image", str(tmp_path / "broken.png"),
                 "--ref-prompt", "a large red circle", "--out", str(tmp_path / "y")]) == 2
    assert "cannot read the reference image" in capsys.readouterr().err


def test_options_from_settings():
    from attnmod.style_aligned import StyleAlignedOptions

    o = StyleAlignedOptions().with_settings(["adain_values=yes", "only-self-level=0.25", "blocks=U*", "reference=1"])
    assert (o.adain_values, o.only_self_level, o.blocks, o.reference) == (True, 0.25, "U*", 1)
    assert StyleAlignedOptions().with_settings([]) == StyleAlignedOptions()
    with pytest.raises(ValueError, match="takes true or false"):
        StyleAlignedOptions().with_settings(["adain_values=maybe"])
    with pytest.raises(ValueError, match="takes a number"):
        StyleAlignedOptions().with_settings(["shared_score_scale=big"])
    with pytest.raises(ValueError, match="fraction in"):
        StyleAlignedOptions().with_settings(["only_self_level=2"])


def test_empty_prompt_list_is_an_error(sd):
    from attnmod.style_aligned import generate_style_set

    with pytest.raises(ValueError, match="at least one prompt"):
        generate_style_set(sd, [])


def test_style_set_is_remade_from_any_of_its_pngs(tmp_path):
    from PIL import Image

    from attnmod.cli import main

    out, again = tmp_path / "set", tmp_path / "again"
    assert main(["style", "--prompt", "a large red circle on the left", "--prompt", "a small blue star on the right",
                 "--style", "outlined style", "--seed", "5", "--steps", "4", "--out", str(out)]) == 0
    assert main(["style", "--recipe", str(out / "01.png"), "--out", str(again)]) == 0
    for name in ("00.png", "01.png"):
        assert Image.open(again / name).tobytes() == Image.open(out / name).tobytes()
    assert main(["style", "--out", str(tmp_path / "none")]) == 2

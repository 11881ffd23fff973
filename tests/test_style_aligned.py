import numpy as np
import pytest
import torch

from attnmod import Schedule, modify
from attnmod.attention import AttentionCall
from attnmod.blocks import short_name
from attnmod.methods.style_aligned import (
    SharedAttention,
    StyleAlignedOptions,
    adain,
    calc_mean_std,
    style_aligned,
    unshared_layers,
)

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
    for options in (StyleAlignedOptions(reference=2), StyleAlignedOptions(reference=2, adain_values=True,
                                                                         shared_score_shift=1.0)):
        with style_aligned(sd, images=3, options=options):
            out = batch(sd)
        assert np.abs(out[2] - stock[2]).max() < 1e-4 and np.abs(out[0] - stock[0]).max() > 1e-3
    with pytest.raises(ValueError, match="reference index 3"):
        style_aligned(sd, images=3, options=StyleAlignedOptions(reference=3))
    with pytest.raises(ValueError, match="no self-attention blocks"):
        style_aligned(sd, images=3, options=StyleAlignedOptions(blocks="cross"))


def test_unshared_layers_follow_the_reference_switch_rule():
    """google/style-aligned's _get_switch_vec: n = int(level * count), every (count // n)-th layer; above 0.5
    the complement at 1 - level (1 - 0.8 is 0.19999..., so n = int(3.2) = 3 and the stride is 16 // 3 = 5)."""
    def unshared(count, level):
        return [i for i, u in enumerate(unshared_layers(count, level)) if u]

    assert unshared(16, 0.5) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert unshared(16, 0.3) == [0, 4, 8, 12]  # n = int(4.8) = 4, stride 4
    assert unshared(16, 0.8) == [i for i in range(16) if i not in (0, 5, 10, 15)]
    assert len(unshared(70, 0.3)) == 24  # SDXL: n = 21, stride 3 -> 46 layers shared
    assert unshared(16, 0.0) == [] and unshared(16, 1.0) == list(range(16))
    assert unshared(16, 0.01) == [] and unshared(16, 0.99) == list(range(16))  # the reference divides by zero


def test_only_self_level_counts_layers_in_diffusers_processor_order(sd, sdxl):
    """The mid block registers after the up blocks, so it is the last of the 16 SD1.5 self layers."""
    half = style_aligned(sd, images=3, options=StyleAlignedOptions(only_self_level=0.5))
    shared = [short_name(n) for n in half.layers]
    assert shared == ["D0A1A1", "D1A1A1", "D2A1A1", "U1A1A1", "U2A0A1", "U2A2A1", "U3A1A1", "M0A0A1"]
    # tiny SDXL: 28 self layers; n = int(0.3 * 28) = 8, stride 28 // 8 = 3: layers 0, 3, ..., 27 (10) unshared
    assert sum(1 for k in sdxl.unet.attn_processors if ".attn1." in k) == 28
    assert len(style_aligned(sdxl, images=3, options=StyleAlignedOptions(only_self_level=0.3)).layers) == 18


def test_full_attention_share_is_one_sequence_per_cfg_half_without_adain():
    """The reference's '(k b) n d -> k (b n) d': every image, the reference too, sees all tokens of its half once."""
    hook = SharedAttention(StyleAlignedOptions(full_attention_share=True, shared_score_scale=3.0,
                                               shared_score_shift=2.0), images=2)
    q, k, v = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)  # (uncond 0, 1, cond 0, 1)
    q2, k2, v2, bias = hook(AttentionCall("x", False, 2, (4, 5, 16)), q, k, v)
    assert torch.equal(q2, q) and bias is None  # no AdaIN, no score scale or shift
    for row, half in ((0, (0, 1)), (1, (0, 1)), (2, (2, 3)), (3, (2, 3))):
        assert torch.equal(k2[row], torch.cat([k[half[0]], k[half[1]]], dim=-2))
        assert torch.equal(v2[row], torch.cat([v[half[0]], v[half[1]]], dim=-2))


def test_full_attention_share_changes_the_reference_too(sd):
    stock = batch(sd)
    with style_aligned(sd, images=3, options=StyleAlignedOptions(full_attention_share=True)):
        out = batch(sd)
    assert np.abs(out - stock).max(axis=(1, 2, 3)).min() > 1e-3
    assert np.array_equal(batch(sd), stock)


def test_adain_over_a_single_token_is_the_identity_and_images_stay_finite(sd):
    x, ref = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert torch.equal(adain(x, ref), x)  # the unbiased variance of one token would be NaN
    with style_aligned(sd, images=2), torch.inference_mode():  # 16 px: the mid block sees a 1x1 latent
        out = sd(["a red cat", "a blue dog"], num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=[torch.Generator().manual_seed(0) for _ in range(2)]).images
    assert np.isfinite(out).all()


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
    from attnmod.methods.style_aligned import StyleAlignedOptions

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
    from attnmod.methods.style_aligned import generate_style_set

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


def test_works_with_a_peft_lora_loaded_on_the_pipeline():
    """A PEFT LoRA on the UNet's attention projections (diffusers' add_adapter): the shared attention goes through
    the LoRA layers, the reference stays what the LoRA model makes alone, the adapter survives the context, and a
    saved reference made under the LoRA replays the joint batch."""
    from peft import LoraConfig

    from attnmod.methods.style_aligned import generate_style_set
    from attnmod.methods.style_reference import compute_reference
    from attnmod.tiny import tiny_sd15

    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    base = batch(pipe)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    lora = batch(pipe)
    assert np.abs(lora - base).max() > 1e-3  # the adapter is live
    with style_aligned(pipe, images=3):
        shared = batch(pipe)
    assert np.abs(shared[0] - lora[0]).max() < 1e-4 and np.abs(shared[1:] - lora[1:]).max() > 1e-3
    assert np.array_equal(batch(pipe), lora)  # processors restored, the adapter still on
    run = {"seed": 0, "steps": 3, "guidance": 5.0, "width": 32, "height": 32}
    joint = generate_style_set(pipe, PROMPTS, **run)
    reference = compute_reference(pipe, PROMPTS[0], **run)
    assert np.abs(generate_style_set(pipe, PROMPTS[1:], saved_reference=reference, **run) - joint).max() < 1e-4
    pipe.unet.disable_adapters()
    assert np.array_equal(batch(pipe), base)


def test_chunked_attention_is_the_whole_attention_query_by_query():
    from attnmod.attention import chunked_attention

    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # (B=1, h=1, Nq=2, d=2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # Nk=3
    v = torch.tensor([[[[1.0], [2.0], [4.0]]]])
    bias = torch.tensor([0.0, 0.0, float("-inf")]).view(1, 1, 1, 3)  # the third key hidden from every query
    out = chunked_attention(q, k, v, bias, scale=1.0, chunk=1)
    # by hand: query 0 scores (1, 0) -> weights (e, 1)/(e + 1); query 1 scores (0, 2) -> (1, e²)/(1 + e²)
    e = np.e
    expected = [(e * 1 + 2) / (e + 1), (1 + e**2 * 2) / (1 + e**2)]
    assert torch.allclose(out.flatten(), torch.tensor(expected), atol=1e-6)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (10, 14, 14))  # (B, h, N, d)
    per_query = torch.randn(2, 3, 10, 14, generator=g)
    broadcast = torch.randn(2, 1, 1, 14, generator=g)
    for mask in (None, per_query, broadcast):
        whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        for chunk in (1, 3, 10, 64):
            assert torch.allclose(chunked_attention(q, k, v, mask, 0.3, chunk), whole, atol=1e-6)


def test_query_chunk_evaluates_the_shared_attention_in_chunks_and_changes_nothing(sd, monkeypatch):
    import attnmod.attention as attention

    with style_aligned(sd, images=3):
        whole = batch(sd)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[-2])
        return sdpa(q, *args, **kwargs)

    from types import SimpleNamespace

    monkeypatch.setattr(attention, "F", SimpleNamespace(scaled_dot_product_attention=spy))  # attnmod's calls only
    with style_aligned(sd, images=3, options=StyleAlignedOptions(query_chunk=5)):
        chunked = batch(sd)
    assert seen and max(seen) == 5  # every shared attention evaluated at most 5 queries at a time
    assert np.abs(chunked - whole).max() < 1e-5
    with pytest.raises(ValueError, match="query_chunk is a number of queries >= 1"):
        StyleAlignedOptions(query_chunk=0)
    assert StyleAlignedOptions().with_settings(["query_chunk=256"]).query_chunk == 256
    assert StyleAlignedOptions(query_chunk=4).with_settings(["query_chunk=none"]).query_chunk is None

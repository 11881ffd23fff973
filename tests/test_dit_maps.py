"""Word maps and self-attention on DiT models: the image-query rows of the joint attention."""

import numpy as np
import pytest
import torch
from conftest import hook_count, run

from attnmod.attention import joint_query_key
from attnmod.dit.maps import t5_pieces, trace
from attnmod.segment import self_segmentation


def capture_stock(pipe, module_name, projection):
    """Inputs of one stock attention call and the result its processor hands to ``projection`` (or returns)."""
    attn = pipe.transformer.get_submodule(module_name)
    seen = {}

    def keep(key, value):  # the first call only; hooks must return None
        seen.setdefault(key, value)

    handles = [attn.register_forward_pre_hook(lambda m, a, k: keep("in", dict(k)), with_kwargs=True)]
    if projection is None:
        handles.append(attn.register_forward_hook(lambda m, a, o: keep("result", o)))
    else:
        handles.append(attn.get_submodule(projection).register_forward_pre_hook(lambda m, a: keep("result", a[0])))
    try:
        run(pipe, steps=1)
    finally:
        for h in handles:
            h.remove()
    return attn, seen


@pytest.mark.parametrize(("name", "module", "projection", "part"), [
    ("sd3", "transformer_blocks.1.attn", "to_out.0", "image"),  # [image ‖ text]
    ("sd3", "transformer_blocks.1.attn", "to_add_out", "text"),
    ("flux", "transformer_blocks.1.attn", "to_out.0", "image"),  # [text ‖ image]
    ("flux", "transformer_blocks.1.attn", "to_add_out", "text"),
    ("flux", "single_transformer_blocks.0.attn", None, "all"),  # joined before the block, no projection
])
def test_joint_query_key_matches_the_stock_processor(name, module, projection, part, request):
    pipe = request.getfixturevalue(name)
    flux = name == "flux"
    attn, seen = capture_stock(pipe, module, projection)
    given = seen["in"]
    x, c = given["hidden_states"], given.get("encoder_hidden_states")
    with torch.no_grad():
        q, k = joint_query_key(attn, x, c, given.get("image_rotary_emb"), text_first=flux)
        split = lambda t: t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        values = [split(attn.to_v(x))] + ([] if c is None else [split(attn.add_v_proj(c))])
        v = torch.cat(values[::-1] if flux else values, dim=2)
        out = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        out = out.transpose(1, 2).flatten(2)  # (B, N, h*d)
    n_txt = 0 if c is None else c.shape[1]
    rows = {"all": slice(None), "image": slice(n_txt, None) if flux else slice(0, x.shape[1]),
            "text": slice(0, n_txt) if flux else slice(x.shape[1], None)}[part]
    assert torch.allclose(out[:, rows], seen["result"], atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_maps_sum_shape_restore_and_leave_the_image_alone(name, request):
    pipe = request.getfixturevalue(name)
    stock = run(pipe, steps=2)
    with trace(pipe) as tc:
        traced = run(pipe, steps=2)
    assert np.array_equal(stock, traced) and hook_count(pipe.transformer) == 0
    calls = 2 * len(tc.modules)  # 2 steps x modules (SD3: attn2 has no text and is not traced)
    heads = pipe.transformer.transformer_blocks[0].attn.heads
    h = w = 8  # 32x32 images: 8x8 image tokens on both
    assert tc.cross.shape[:3] == (1, h, w) and tc.self_maps.shape == (1, h * w, h * w)  # CFG: the cond half only
    # every image query's probabilities sum to 1 per head over text + image keys
    total = tc.cross.sum(-1).flatten(1) + tc.self_maps.sum(-1)
    assert torch.allclose(total, torch.full_like(total, heads * calls), rtol=1e-5)
    maps = tc.result("a red cat")
    m = maps.word_map("cat")
    assert m.shape == (h, w) and float(m.min()) == 0.0 and abs(float(m.max()) - 1.0) < 1e-6
    assert maps.cross.shape[-1] == len(maps.tokens[0])
    assert maps.token_index("cat") != maps.token_index("red")
    seg = self_segmentation(maps, k=2)
    assert seg.labels.shape == (h, w)
    assert maps.self_attention_pca().size == (w, h)


def test_flux_true_cfg_keeps_the_positive_call_and_steps_select(flux, sd3):
    with trace(flux, blocks="S0I", steps=(0, 1)) as tc:  # step 0: the same latents with or without true CFG
        run(flux, steps=3, negative_prompt="a blue dog", true_cfg_scale=4.0)
    with trace(flux, blocks="S0", steps=(0, 1)) as plain:
        run(flux, steps=3)
    assert torch.allclose(tc.cross, plain.cross, atol=1e-6)  # the negative call is left out
    with trace(flux, blocks="J0", steps=(1, 2)) as tc3:
        run(flux, steps=3)
    total = tc3.cross.sum(-1).flatten(1) + tc3.self_maps.sum(-1)
    assert torch.allclose(total, torch.full_like(total, 2.0), rtol=1e-5)  # one step x 2 heads
    with pytest.raises(ValueError, match="no joint or single attention"):
        trace(sd3, blocks="J0I2")


def test_t5_pieces_read_as_words():
    pieces = t5_pieces(["▁a", "▁re", "d", "▁cat", "</s>", "<pad>"])
    assert pieces == ["a</w>", "re", "d</w>", "cat</w>", "<|/s|>", "<|pad|>"]


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_cli_maps_on_dit(model, tmp_path, capsys):
    from attnmod.cli import main

    out = tmp_path / "maps"
    assert main(["maps", "--model", model, "--prompt", "a red cat", "--steps", "2", "--out", str(out)]) == 0
    for name in ("image.png", "words.png", "self-attention-pca.png", "segments.png"):
        assert (out / name).is_file()
    assert "segment 0:" in capsys.readouterr().out

"""DiT models (SD3 / SD3.5 / FLUX): block names, AttnMod's scaling by hand, neutrality, batching, steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hook_count, run
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from attnmod import Schedule, modify
from attnmod.blocks import list_blocks, resolve_blocks
from attnmod.modify import AttnMod

CONFIGS = Path(__file__).parents[1] / "attnmod" / "configs"


def meta_transformer(name):
    cls = FluxTransformer2DModel if name.startswith("flux") else SD3Transformer2DModel
    with torch.device("meta"):
        return cls.from_config(json.loads((CONFIGS / f"{name}_transformer.json").read_text()))


@pytest.mark.parametrize(("name", "layers", "count", "last"), [
    ("sd3_medium", 24, 24 + 23, "J23I"),  # the last block has no text output
    ("sd35_large", 38, 38 + 37, "J37I"),
    ("sd35_medium", 24, 24 + 23 + 13, "J23I"),  # 13 dual layers with an image-only attn2
    ("flux1_dev", 19, 19 * 2 + 38 * 2 - 1, "S37I"),  # FLUX drops the text after its last single block
])
def test_real_configs_block_counts(name, layers, count, last):
    model = meta_transformer(name)
    blocks = list_blocks(model)
    assert len(blocks) == count and len({b.short for b in blocks}) == count
    assert len(model.transformer_blocks) == layers and blocks[-1].short == last
    shorts = [b.short for b in blocks]
    if name == "flux1_dev":
        assert len(model.single_transformer_blocks) == 38
        assert shorts[:2] == ["J0I", "J0T"] and "S36T" in shorts and "S37T" not in shorts
        assert len(resolve_blocks(blocks, "joint")) == 38 and len(resolve_blocks(blocks, "single")) == 75
    if name == "sd35_medium":
        assert shorts[:3] == ["J0I", "J0T", "J0I2"] and "J13I2" not in shorts
    for b in blocks:
        module, _, stream = b.name.partition(":")
        assert stream == b.kind and model.get_submodule(module) is not None


def test_selectors(sd3, flux):
    names = {b.short: b.name for b in list_blocks(flux)}
    assert names["J1T"] == "transformer_blocks.1.attn:text"
    assert names["S0I"] == "single_transformer_blocks.0.attn:image"
    assert [b.short for b in resolve_blocks(flux, "J1")] == ["J1I", "J1T"]
    assert [b.short for b in resolve_blocks(flux, "transformer_blocks.1.attn")] == ["J1I", "J1T"]
    assert [b.short for b in resolve_blocks(flux, "single_transformer_blocks.0.attn:text")] == ["S0T"]
    assert [b.short for b in resolve_blocks(flux, "s*i")] == ["S0I", "S1I"]
    assert [b.short for b in resolve_blocks(flux, "text")] == ["J0T", "J1T", "S0T"]
    assert [b.short for b in resolve_blocks(flux, "J0I+S1")] == ["J0I", "S1I"]
    assert [b.short for b in resolve_blocks(sd3, "J0")] == ["J0I", "J0T", "J0I2"]
    assert [b.short for b in resolve_blocks(sd3, "image")] == ["J0I", "J0I2", "J1I", "J2I"]
    for block in list_blocks(sd3):
        assert resolve_blocks(sd3, block.short.lower()) == [block]
        assert resolve_blocks(sd3, block.name) == [block]


def test_bad_names_give_closest_valid_ones(sd, sd3, flux):
    with pytest.raises(ValueError, match=r"UNet block name.*closest: J"):
        resolve_blocks(flux, "U1A1A2")
    with pytest.raises(ValueError, match=r"DiT block name.*closest: "):
        resolve_blocks(sd, "J3I")
    with pytest.raises(ValueError, match=r"block J2 has no text output 'T'.*its streams: J2I$"):
        resolve_blocks(sd3, "J2T")  # the last SD3 block (context_pre_only)
    with pytest.raises(ValueError, match=r"block S1 has no text output.*S1I$"):
        resolve_blocks(flux, "S1T")
    with pytest.raises(ValueError, match=r"block J1 has no image output 'I2'"):
        resolve_blocks(sd3, "J1I2")  # attn2 only on the dual layer J0
    with pytest.raises(ValueError, match="group 'self' is not one of this model's: all, image, text"):
        resolve_blocks(sd3, "self")
    with pytest.raises(ValueError, match="closest: J1I"):
        modify(flux, {"J9I": 2.0})


# -- the scaled attention, by hand ----------------------------------------------------------------------------
def transformer_inputs(pipe, batch=2, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    net, cfg = pipe.transformer, pipe.transformer.config
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    context = torch.randn(batch, text, cfg.joint_attention_dim, generator=g)
    t = torch.full((batch,), 500.0) if isinstance(net, SD3Transformer2DModel) else torch.full((batch,), 0.5)
    if isinstance(net, SD3Transformer2DModel):
        return {"hidden_states": torch.randn(batch, cfg.in_channels, 16, 16, generator=g), "timestep": t,
                "encoder_hidden_states": context, "pooled_projections": pooled}
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    return {"hidden_states": torch.randn(batch, 64, cfg.in_channels, generator=g), "timestep": t,
            "encoder_hidden_states": context, "pooled_projections": pooled,
            "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3)}


def call_with(pipe, mods, module_name):
    """Run the transformer once under AttnMod; the attention module's inputs and (scaled) outputs."""
    net = pipe.transformer
    attn = net.get_submodule(module_name)
    seen = {}
    pre = attn.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", dict(k)), with_kwargs=True)
    try:
        with torch.no_grad(), AttnMod(net, mods, auto_step=False) as ctl:
            ctl.start_loop(1)
            ctl.set_step(0)
            post = attn.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))  # after AttnMod's
            try:
                net(**transformer_inputs(pipe))
            finally:
                post.remove()
    finally:
        pre.remove()
    assert hook_count(net) == 0
    return attn, seen["in"], seen["out"]


def heads(t, h):  # (B, N, h*d) -> (B, h, N, d)
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def merge(t):  # (B, h, N, d) -> (B, N, h*d)
    return t.transpose(1, 2).flatten(2)


def softmax_attention(q, k, v):  # (B, h, N, d) each
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


M_IMAGE, M_TEXT = torch.tensor([2.0, -3.0]).view(2, 1, 1), torch.tensor([0.5, 1.0]).view(2, 1, 1)
PER_IMAGE = [{"IMG": 2.0, "TXT": 0.5}, {"IMG": -3.0}]


def mods_for(image, text):
    return [{k.replace("IMG", image).replace("TXT", text): v for k, v in m.items()} for m in PER_IMAGE]


def test_sd3_joint_block_by_hand(sd3):
    attn, given, (img_out, txt_out) = call_with(sd3, mods_for("J1I", "J1T"), "transformer_blocks.1.attn")
    x, c, h = given["hidden_states"], given["encoder_hidden_states"], attn.heads
    with torch.no_grad():
        q = torch.cat([attn.norm_q(heads(attn.to_q(x), h)), attn.norm_added_q(heads(attn.add_q_proj(c), h))], 2)
        k = torch.cat([attn.norm_k(heads(attn.to_k(x), h)), attn.norm_added_k(heads(attn.add_k_proj(c), h))], 2)
        v = torch.cat([heads(attn.to_v(x), h), heads(attn.add_v_proj(c), h)], 2)
        o = merge(softmax_attention(q, k, v))  # [image ‖ text]
        n = x.shape[1]
        assert torch.allclose(img_out, attn.to_out[0](M_IMAGE * o[:, :n]), atol=1e-5)
        assert torch.allclose(txt_out, attn.to_add_out(M_TEXT * o[:, n:]), atol=1e-5)
        assert not torch.allclose(img_out, attn.to_out[0](o[:, :n]), atol=1e-3)


def test_sd35_image_only_attn2_by_hand(sd3):
    mods = [{"J0I2": 2.0}, {"J0I2": -3.0}]
    attn, given, out = call_with(sd3, mods, "transformer_blocks.0.attn2")
    x, h = given["hidden_states"], attn.heads
    with torch.no_grad():
        q, k = attn.norm_q(heads(attn.to_q(x), h)), attn.norm_k(heads(attn.to_k(x), h))
        o = merge(softmax_attention(q, k, heads(attn.to_v(x), h)))
        assert torch.allclose(out, attn.to_out[0](M_IMAGE * o), atol=1e-5)


def flux_qkv(attn, x, rope, added=None):
    """FLUX projections by hand: (B, h, N, d) with q/k norms, [text ‖ image], rotary embedding."""
    h = attn.heads

    def proj(lin, norm, t):
        out = heads(lin(t), h)
        return out if norm is None else norm(out.transpose(1, 2)).transpose(1, 2)  # norms over d on (B, N, h, d)

    q, k, v = proj(attn.to_q, attn.norm_q, x), proj(attn.to_k, attn.norm_k, x), proj(attn.to_v, None, x)
    if added is not None:
        q = torch.cat([proj(attn.add_q_proj, attn.norm_added_q, added), q], 2)
        k = torch.cat([proj(attn.add_k_proj, attn.norm_added_k, added), k], 2)
        v = torch.cat([proj(attn.add_v_proj, None, added), v], 2)
    rot = [apply_rotary_emb(t.transpose(1, 2), rope, sequence_dim=1).transpose(1, 2) for t in (q, k)]
    return rot[0], rot[1], v


def test_flux_double_block_by_hand(flux):
    attn, given, (img_out, txt_out) = call_with(flux, mods_for("J1I", "J1T"), "transformer_blocks.1.attn")
    x, c = given["hidden_states"], given["encoder_hidden_states"]
    with torch.no_grad():
        o = merge(softmax_attention(*flux_qkv(attn, x, given["image_rotary_emb"], added=c)))  # [text ‖ image]
        n = c.shape[1]
        assert torch.allclose(img_out, attn.to_out[0](M_IMAGE * o[:, n:]), atol=1e-5)
        assert torch.allclose(txt_out, attn.to_add_out(M_TEXT * o[:, :n]), atol=1e-5)


def test_flux_single_block_by_hand(flux):
    attn, given, out = call_with(flux, mods_for("S0I", "S0T"), "single_transformer_blocks.0.attn")
    x = given["hidden_states"]  # joined [text ‖ image], 5 text tokens
    with torch.no_grad():
        o = merge(softmax_attention(*flux_qkv(attn, x, given["image_rotary_emb"])))  # no output projection
        assert torch.allclose(out[:, :5], M_TEXT * o[:, :5], atol=1e-5)
        assert torch.allclose(out[:, 5:], M_IMAGE * o[:, 5:], atol=1e-5)


# -- pipelines ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_neutral_is_bit_identical_and_restored(name, request):
    pipe = request.getfixturevalue(name)
    before = dict(pipe.transformer.attn_processors)
    stock = run(pipe)
    with modify(pipe, {"all": Schedule()}):
        neutral = run(pipe)
    with modify(pipe, {"all": Schedule(values=(1.0, 1.0, 1.0))}):
        neutral_list = run(pipe)
    with modify(pipe, {"J*": Schedule(-5, 0.5)}) as ctl:
        assert pipe.transformer.attn_processors == before  # hooks, not processors
        assert hook_count(pipe.transformer) == 2 + len(ctl.blocks)  # step pre-hook, fp16 overflow check, scales
        changed = run(pipe)
    after = run(pipe)
    assert np.array_equal(stock, neutral) and np.array_equal(stock, neutral_list) and np.array_equal(stock, after)
    assert not np.allclose(stock, changed, atol=1e-3)
    assert hook_count(pipe.transformer) == 0
    with pytest.raises(RuntimeError, match="boom"), modify(pipe, {"all": 2.0}):
        raise RuntimeError("boom")
    assert hook_count(pipe.transformer) == 0 and np.array_equal(run(pipe), stock)


@pytest.mark.parametrize(("name", "mods"), [
    ("sd3", [{}, {"J1I": Schedule(-5, 0.5)}, {"J0T+J0I2": 3.0}]),  # CFG: both halves of the batch
    ("flux", [{}, {"S0I": Schedule(-5, 0.5)}, {"J1": 3.0, "S0T": -2.0}]),
])
def test_per_image_settings_in_one_batch_equal_single_runs(name, mods, request):
    pipe = request.getfixturevalue(name)
    with torch.inference_mode(), modify(pipe, mods):
        out = pipe(["a red cat"] * 3, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                   generator=[torch.Generator().manual_seed(0) for _ in mods], output_type="np").images
    singles = []
    for mod in mods:
        with modify(pipe, mod):
            singles.append(run(pipe)[0])
    for image, single in zip(out, singles, strict=True):
        assert np.abs(image - single).max() < 1e-5  # different batch sizes: not bit-equal with 2 threads
    assert not np.allclose(singles[0], singles[1], atol=1e-3) and not np.allclose(singles[0], singles[2], atol=1e-3)


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_flux_steps_follow_the_scheduler_with_true_cfg(flux, true_cfg):
    """FLUX's true CFG calls the transformer twice per step: both calls get the step's multiplier."""
    seen = []
    with modify(flux, {"J0I": Schedule(start=2.0, rate=-0.4)}) as ctl:
        h = flux.transformer.transformer_blocks[0].attn.to_out[0].register_forward_pre_hook(
            lambda m, a: seen.append((ctl.step, ctl._current[ctl.blocks[0].name].flatten().tolist())))
        run(flux, steps=3, negative_prompt="a blue dog", true_cfg_scale=true_cfg)
        run(flux, steps=3, negative_prompt="a blue dog", true_cfg_scale=true_cfg)  # a new loop starts at 0
        h.remove()
    calls = 2 if true_cfg > 1 else 1
    assert [s for s, _ in seen] == [s for s in (0, 1, 2) for _ in range(calls)] * 2
    for step, mult in seen:
        assert mult == pytest.approx([2.0 - 0.4 * step])
    with modify(flux, {"J0I": Schedule(values=(1.0, 1.0, 1.0))}):  # a list of one value per step, not per call
        run(flux, steps=3, negative_prompt="a blue dog", true_cfg_scale=4.0)


def test_sd3_steps_with_cfg(sd3):
    seen = []
    with modify(sd3, {"J2I": Schedule(start=2.0, rate=-0.4)}) as ctl:
        h = sd3.transformer.transformer_blocks[2].attn.to_out[0].register_forward_pre_hook(
            lambda m, a: seen.append((ctl.step, ctl._current[ctl.blocks[0].name].flatten().tolist())))
        run(sd3, steps=3)
        h.remove()
    assert [s for s, _ in seen] == [0, 1, 2]
    for step, mult in seen:
        assert mult == pytest.approx([2.0 - 0.4 * step] * 2)  # both CFG halves

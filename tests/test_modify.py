import numpy as np
import pytest
import torch
from conftest import hook_count, run
from diffusers import (
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
)

from attnmod import Schedule, modify
from attnmod.blocks import resolve_blocks


def module(pipe, short):
    [block] = resolve_blocks(pipe.unet, short)
    return dict(pipe.unet.named_modules())[block.name]


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_neutral_settings_are_bit_identical_to_stock(name, request):
    pipe = request.getfixturevalue(name)
    stock = run(pipe)
    with modify(pipe, {"all": Schedule()}):
        neutral = run(pipe)
    with modify(pipe, {"all": Schedule(values=(1.0, 1.0, 1.0))}):
        neutral_list = run(pipe)
    with modify(pipe, {"U*": Schedule(-5, 0.5)}):
        changed = run(pipe)
    after = run(pipe)
    assert np.array_equal(stock, neutral) and np.array_equal(stock, neutral_list)
    assert np.array_equal(stock, after)
    assert not np.allclose(stock, changed, atol=1e-3)
    assert hook_count(pipe.unet) == 0


def capture_attention(pipe, short, schedule, steps=2):
    """Run the pipeline and record, at the block's last call, its inputs, to_out input and output."""
    attn = module(pipe, short)
    seen = {}

    def pre(mod, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen["context"] = None if enc is None else enc.detach().clone()

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))]
    try:
        with modify(pipe, {short: schedule}):
            # registered after AttnMod's hook: sees the scaled input of to_out
            h = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("to_out_in", a[0].clone()))
            try:
                run(pipe, steps=steps)
            finally:
                h.remove()
    finally:
        for h in handles:
            h.remove()
    return attn, seen


def hand_attention(attn, hidden, context):
    """softmax(Q K^T / sqrt(d)) V with heads merged, computed by hand from the module's weights."""
    context = hidden if context is None else context
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    b, n, inner = q.shape
    h = attn.heads
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    weights = (q @ k.transpose(-1, -2) / (inner // h) ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)  # (B, N, h*d)


@pytest.mark.parametrize("short", ["U1A1A2", "M0A0A1"])
def test_multiplier_scales_the_attention_result_before_to_out(sd, short):
    m = -3.5
    attn, seen = capture_attention(sd, short, Schedule(start=m), steps=1)
    with torch.no_grad():
        expected = hand_attention(attn, seen["hidden"], seen["context"]) * m
        assert torch.allclose(seen["to_out_in"], expected, atol=1e-5)
        assert torch.allclose(seen["out"], attn.to_out[0](expected), atol=1e-5)


def test_multiplier_zero_leaves_only_the_projection_bias(sd):
    attn, seen = capture_attention(sd, "U1A1A2", Schedule(start=0.0))
    bias = attn.to_out[0].bias
    assert torch.equal(seen["out"], bias.expand_as(seen["out"]))


def test_steps_follow_the_schedule_with_cfg_and_pndm(sd):
    """Step i is the i-th UNet call of the loop; PNDM makes steps + 1 calls."""
    original = sd.scheduler
    sd.scheduler = PNDMScheduler.from_config(original.config, skip_prk_steps=True)
    seen = []
    try:
        with modify(sd, {"U1A1A2": Schedule(start=2.0, rate=-0.3)}) as ctl:
            to_out = module(sd, "U1A1A2").to_out[0]
            h = to_out.register_forward_pre_hook(
                lambda m, a: seen.append((ctl.step, ctl._current[ctl.blocks[0].name].flatten().tolist())))
            run(sd, steps=4)
            run(sd, steps=4)  # a second pipeline call starts again at step 0
            h.remove()
    finally:
        sd.scheduler = original
    steps = [s for s, _ in seen]
    assert steps == [0, 1, 2, 3, 4] * 2
    for step, mult in seen:
        assert mult == pytest.approx([2.0 - 0.3 * step] * 2)  # both halves of the CFG batch


def test_per_image_settings_in_one_batch_equal_single_runs(sd):
    mods = [{}, {"U1A1A2": Schedule(-5, 0.5)}, {"M0A0A1+M0A0A2": 3.0}]
    with torch.inference_mode(), modify(sd, mods):
        out = sd(["a red cat"] * 3, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 generator=[torch.Generator().manual_seed(0) for _ in mods], output_type="np").images
    for image, mod in zip(out, mods, strict=True):
        with modify(sd, mod):
            single = run(sd)[0]
        assert np.abs(image - single).max() < 1e-3


def test_restores_on_exception_and_rejects_bad_batches(sd):
    with pytest.raises(RuntimeError, match="boom"), modify(sd, {"all": 2.0}):
        assert hook_count(sd.unet) > 0
        raise RuntimeError("boom")
    assert hook_count(sd.unet) == 0
    with pytest.raises(ValueError, match="multiple of the 3"), modify(sd, [{}, {}, {"U1A1A2": 2}]):
        run(sd)  # a batch of 1 image x 2 CFG copies cannot carry 3 settings
    with pytest.raises(ValueError, match="UNet calls"), modify(sd, {"U1A1A2": Schedule(values=(1, 2))}):
        run(sd, steps=3)  # list of 2 values for a 3-step loop
    assert hook_count(sd.unet) == 0
    with pytest.raises(ValueError, match="unknown attention block"):
        modify(sd, {"U9A9A9": 2.0})


def test_processors_are_untouched(sd):
    before = dict(sd.unet.attn_processors)
    with modify(sd, {"all": -2.0}):
        assert sd.unet.attn_processors == before
    assert sd.unet.attn_processors == before


def test_img2img_and_controlnet_pipelines(sd):
    components = {k: v for k, v in sd.components.items()}
    img2img = StableDiffusionImg2ImgPipeline(**components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    stock = run(img2img, image=image, strength=0.6, steps=5, height=None, width=None)
    with modify(img2img, {"U1A1A2": 1.0}):
        assert np.array_equal(run(img2img, image=image, strength=0.6, steps=5, height=None, width=None), stock)
    with modify(img2img, {"U1A1A2": Schedule(-8, 1.0)}) as ctl:
        changed = run(img2img, image=image, strength=0.6, steps=5, height=None, width=None)
        assert ctl.step == 2  # 3 UNet calls: the loop starts at step 0 whatever the strength
    assert not np.allclose(changed, stock, atol=1e-3)

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 16))
    cn = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    cn.set_progress_bar_config(disable=True)
    cond = torch.rand(1, 3, 32, 32)
    stock = run(cn, image=cond)
    with modify(cn, {"U1A1A2": 1.0}):
        assert np.array_equal(run(cn, image=cond), stock)
    with modify(cn, {"U1A1A2": -8.0}):
        assert not np.allclose(run(cn, image=cond), stock, atol=1e-3)
    assert np.array_equal(run(cn, image=cond), stock)


def test_lora_wrapped_projection_is_scaled_too():
    peft = pytest.importorskip("peft")
    from attnmod.tiny import tiny_sd15

    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                          init_lora_weights=False))
    stock = run(pipe)
    with modify(pipe, {"U1A1A2": 1.0}):
        assert np.array_equal(run(pipe), stock)
    attn, seen = capture_attention(pipe, "U1A1A2", Schedule(start=0.0))
    base_bias = attn.to_out[0].base_layer.bias
    assert torch.allclose(seen["out"], base_bias.expand_as(seen["out"]), atol=1e-6)


def test_own_loop_with_explicit_steps(sd):
    """Callers that own the loop drive the step: set_step, never a count of calls."""
    unet = sd.unet
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 16, 32)
    with torch.no_grad():
        stock = unet(sample, 10, context).sample
        with modify(unet, {"U1A1A2": Schedule(values=(1.0, 0.0))}, auto_step=False) as ctl:
            ctl.start_loop(2)
            ctl.set_step(0)
            same = unet(sample, 10, context).sample
            ctl.set_step(1)
            zeroed = unet(sample, 10, context).sample
            zeroed_again = unet(sample, 10, context).sample
    assert torch.equal(stock, same)
    assert not torch.allclose(stock, zeroed) and torch.equal(zeroed, zeroed_again)

"""StyleAligned with ControlNet: the targets follow their control images, the reference gets zero residuals."""

import re

import numpy as np
import pytest
import torch
from conftest import hook_count
from PIL import Image

from attnmod.methods.style_aligned import (
    StyleAlignedOptions,
    controlnet_pipeline,
    generate_style_set,
    style_aligned,
    zero_controlnet,
)

PROMPTS = ["a red cat", "a blue dog", "a green star"]
RUN = {"steps": 3, "guidance": 5.0, "width": 32, "height": 32}


def controls(seed: int, n: int = 2, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def active_controlnet(pipe):
    """A tiny ControlNet from the UNet whose zero-initialised convolutions are given random weights, so that its
    residuals are not zero and depend on the control image."""
    cn = zero_controlnet(pipe)
    torch.manual_seed(1)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return cn


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipes(request):
    pipe = request.getfixturevalue(request.param)
    return pipe, controlnet_pipeline(pipe, active_controlnet(pipe)), controlnet_pipeline(pipe, zero_controlnet(pipe))


def test_zero_controlnet_is_neutral_bit_for_bit(pipes):
    """from_unet zero-initialises the ControlNet's output convolutions: its residuals are exactly 0, x + 0 == x,
    so every image — the targets too — is bit-identical to StyleAligned without control."""
    pipe, _, neutral = pipes
    plain = generate_style_set(pipe, PROMPTS, **RUN)
    assert np.array_equal(generate_style_set(neutral, PROMPTS, controls=controls(0), **RUN), plain)


def test_reference_gets_no_control_and_targets_follow_theirs(pipes):
    pipe, controlled, _ = pipes
    plain = generate_style_set(pipe, PROMPTS, **RUN)
    a = generate_style_set(controlled, PROMPTS, controls=controls(0), **RUN)
    b = generate_style_set(controlled, PROMPTS, controls=controls(1), **RUN)
    assert np.array_equal(a[0], plain[0]) and np.array_equal(b[0], plain[0])  # the reference: bit-identical
    assert np.abs(a[1:] - plain[1:]).max(axis=(1, 2, 3)).min() > 1e-3  # every target is controlled
    assert np.abs(a[1:] - b[1:]).max(axis=(1, 2, 3)).min() > 1e-3  # ... by its own control image
    half = generate_style_set(controlled, PROMPTS, controls=controls(0), control_scale=0.0, **RUN)
    assert np.array_equal(half, plain)  # scale 0: no control anywhere
    other = generate_style_set(controlled, PROMPTS, options=StyleAlignedOptions(reference=2),
                               controls=controls(0), **RUN)
    alone = generate_style_set(pipe, PROMPTS, options=StyleAlignedOptions(reference=2), **RUN)
    assert np.array_equal(other[2], alone[2])  # the reference's slot follows options.reference


def test_without_the_zeroing_the_reference_would_follow_the_control(pipes):
    """The stock pipeline gives every row its control; the hook is what keeps the reference unconditioned."""
    pipe, controlled, _ = pipes
    plain = generate_style_set(pipe, PROMPTS, **RUN)
    with torch.inference_mode():
        stock = controlled(PROMPTS, image=[controls(2, 1)[0], *controls(0)], num_inference_steps=3,
                           guidance_scale=5.0, height=32, width=32, output_type="np",
                           generator=[torch.Generator().manual_seed(i) for i in range(3)]).images
    assert np.abs(stock[0] - plain[0]).max() > 1e-3  # no StyleAligned, stock control: the reference changes


def test_hooks_restored_on_exit_and_on_error(pipes):
    _, controlled, _ = pipes
    processors = dict(controlled.unet.attn_processors)
    with style_aligned(controlled, images=3):
        assert hook_count(controlled.controlnet) == 1
    with pytest.raises(RuntimeError, match="boom"), style_aligned(controlled, images=3):
        raise RuntimeError("boom")
    assert hook_count(controlled.controlnet) == 0 and hook_count(controlled.unet) == 0
    assert dict(controlled.unet.attn_processors) == processors


def test_guess_mode_zeroes_the_reference_in_the_conditional_half(pipes):
    """In guess mode the ControlNet sees only the conditional rows (one copy): the reference row is still found."""
    pipe, controlled, _ = pipes
    plain = generate_style_set(pipe, PROMPTS, **RUN)
    with style_aligned(controlled, images=3), torch.inference_mode():
        out = controlled(PROMPTS, image=[controls(2, 1)[0], *controls(0)], num_inference_steps=3, guidance_scale=5.0,
                         height=32, width=32, output_type="np", guess_mode=True,
                         generator=[torch.Generator().manual_seed(i) for i in range(3)]).images
    assert np.array_equal(out[0], plain[0]) and np.abs(out[1:] - plain[1:]).max() > 1e-3


def test_bad_control_images_are_refused_before_work(sd):
    controlled = controlnet_pipeline(sd, zero_controlnet(sd))
    calls = []
    handle = controlled.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="1 control image\\(s\\) for 2 target prompt\\(s\\)"):
            generate_style_set(controlled, PROMPTS, controls=controls(0, 1), **RUN)
        with pytest.raises(ValueError, match="control image 2 is 40x40; this run makes 32x32"):
            generate_style_set(controlled, PROMPTS, controls=[*controls(0, 1), *controls(0, 1, 40)], **RUN)
        with pytest.raises(ValueError, match="not a PIL image"):
            generate_style_set(controlled, PROMPTS, controls=[np.zeros((32, 32, 3))] * 2, **RUN)
        with pytest.raises(ValueError, match="needs control images"):
            generate_style_set(controlled, PROMPTS, **RUN)
        with pytest.raises(ValueError, match="need a ControlNet pipeline"):
            generate_style_set(sd, PROMPTS, controls=controls(0), **RUN)
        with pytest.raises(ValueError, match="at least one target"):
            generate_style_set(controlled, PROMPTS[:1], controls=[], **RUN)
    finally:
        handle.remove()
    assert not calls


def test_controlnet_of_another_family_is_refused(sd, sdxl):
    with pytest.raises(ValueError, match="another model family"):
        controlnet_pipeline(sd, zero_controlnet(sdxl))


def test_real_reference_image_with_control(sd):
    """An inverted reference in slot 0 is not controlled either; the controls go to the targets in order."""
    controlled = controlnet_pipeline(sd, active_controlnet(sd))
    ref = Image.fromarray((generate_style_set(sd, PROMPTS[:1], **RUN)[0] * 255).round().astype(np.uint8))
    kw = {"reference_image": ref, "reference_prompt": "a red cat", **RUN}
    plain = generate_style_set(sd, PROMPTS[1:], **kw)
    out = generate_style_set(controlled, PROMPTS[1:], controls=controls(0), **kw)
    assert out.shape[0] == 3 and np.array_equal(out[0], plain[0]) and np.abs(out[1:] - plain[1:]).max() > 1e-3


def test_cli_control_with_the_neutral_controlnet(tmp_path, capsys):
    """--controlnet embedded-zero on the embedded model: bit-identical to the set without control; control images
    of the wrong count or size, or without --controlnet, are one-line errors before any work."""
    import json

    from attnmod.cli import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(a)
    Image.new("RGB", (32, 32)).save(b)
    run = ["style", "--prompt", "a large red circle on the left, on a striped yellow background",
           "--prompt", "a small blue star on the right", "--prompt", "a small green square at the top", "--steps", "3"]
    assert main([*run, "--out", str(tmp_path / "plain")]) == 0
    assert main([*run, "--control", str(a), "--control", str(a), "--controlnet", "embedded-zero",
                 "--out", str(tmp_path / "zero")]) == 0
    for i in range(3):
        assert (Image.open(tmp_path / "zero" / f"{i:02d}.png").tobytes()
                == Image.open(tmp_path / "plain" / f"{i:02d}.png").tobytes())
    info = json.loads(Image.open(tmp_path / "zero" / "01.png").text["attnmod_style"])
    assert info["controlnet"] == "embedded-zero" and info["controls"] == [str(a.resolve())] * 2
    assert main(["style", "--recipe", str(tmp_path / "zero" / "02.png"), "--out", str(tmp_path / "again")]) == 0
    assert Image.open(tmp_path / "again" / "02.png").tobytes() == Image.open(tmp_path / "zero" / "02.png").tobytes()
    capsys.readouterr()
    for extra, message in ((["--control", str(a), "--controlnet", "embedded-zero"],
                            "1 control image\\(s\\) for 2 target prompt\\(s\\)"),
                           (["--control", str(a), "--control", str(b), "--controlnet", "embedded-zero"],
                            "control image 2 is 32x32; this run makes 64x64"),
                           (["--control", str(a), "--control", str(a)], "--control images need --controlnet"),
                           (["--controlnet", "embedded-zero"], "--control images need --controlnet"),
                           (["--control", str(a), "--control", str(a), "--controlnet", str(tmp_path)],
                            "not a diffusers ControlNet folder"),
                           (["--control", str(a), "--control", str(tmp_path / "none.png"), "--controlnet",
                             "embedded-zero"], "--control .*none.png: cannot read the image")):
        assert main([*run, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()

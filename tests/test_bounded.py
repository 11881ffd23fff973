"""Bounded Attention and layout guidance: the reference's rules on hand-built cases, and the intervention on tiny
SD1.5 and SDXL topologies (restored on exit and on error, neutral = stock, guidance lowers the loss)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import attnmod
from attnmod.blocks import list_blocks
from attnmod.methods.bounded import (
    BoundedAttention,
    BoundedOptions,
    Subject,
    _conditioning,
    bounded,
    box_masks,
    cross_bias,
    eos_position,
    filtered_tokens,
    foreground_background,
    guidance_step_size,
    iou_loss,
    reference_layers,
    refine_masks,
    self_bias,
    subject_tokens,
)
from attnmod.tiny import tiny_sd15, tiny_sdxl

MIN = torch.finfo(torch.float32).min
CONFIGS = Path(attnmod.__file__).parent / "configs"
LEFT, RIGHT = (0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def _subjects():
    return [Subject("red circle", LEFT), Subject("blue square", RIGHT)]


PROMPT = "a red circle and a blue square"


@pytest.mark.parametrize("config, loss, mask", [("sd15_unet", range(12, 20), range(14, 20)),
                                                ("sdxl_unet", range(70, 82), range(70, 82))])
def test_reference_layers_are_the_reference_indices(config, loss, mask):
    """The reference counts attention layers in execution order (down, mid, up): SD1.5 loss 12-19, masks 14-19;
    SDXL 70-81. The resolution rule picks exactly those."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / f"{config}.json").read_text()))
    order = [b.name for b in list_blocks(unet)]
    got_loss, got_mask = reference_layers(unet)
    assert sorted(order.index(n) for n in got_loss) == list(loss)
    assert sorted(order.index(n) for n in got_mask) == list(mask)


def test_box_masks_round_like_python():
    m = box_masks([(0.05, 0.2, 0.45, 0.8)], 16, 16).view(16, 16)
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 12, 1, 6)  # y 3.2->3, 12.8->13; x 0.8->1, 7.2->7
    m = box_masks([(0.15625, 0.0, 1.0, 1.0)], 16, 16).view(16, 16)  # x0 * 16 = 2.5: round half to even -> 2
    assert m[0].nonzero().min() == 2


def test_cross_bias_hand_case():
    # 2x2 grid: pixel 0 is subject A's, pixel 1 subject B's, pixels 2 and 3 background.
    # tokens: 0 BOS, 1 A's word, 2 a function word, 3 B's word, 4 another word, 5 the first EOS
    masks = torch.tensor([[[1, 0, 0, 0], [0, 1, 0, 0]]], dtype=torch.bool)
    bias = cross_bias(masks, [[1], [3]], [2], 5, 6)[0]
    allowed = (bias == 0).int().tolist()
    assert allowed == [[1, 1, 0, 0, 1, 1],  # A's pixel: A's token, not B's; never the function word
                       [1, 0, 0, 1, 1, 1],
                       [1, 0, 0, 0, 1, 0],  # background: no subject token, no EOS
                       [1, 0, 0, 0, 1, 0]]
    assert bias.min() == MIN
    guiding = (cross_bias(masks, [[1], [3]], [2], 5, 6, background_sees_subjects=True)[0] == 0).int().tolist()
    assert guiding[2] == [1, 1, 0, 1, 1, 1]  # during guidance the background sees every subject, and the EOS
    assert guiding[0] == [1, 1, 0, 0, 1, 1]
    no_eos = (cross_bias(masks, [[1], [3]], [2], 5, 6, mask_eos=False)[0] == 0).int().tolist()
    assert no_eos[2] == [1, 0, 0, 0, 1, 1]


def test_self_bias_hand_case_with_overlap():
    # 4 pixels: 0 only A, 1 A and B (overlapping boxes), 2 only B, 3 background
    masks = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 0]]], dtype=torch.bool)
    allowed = (self_bias(masks)[0] == 0).int().tolist()
    assert allowed == [[1, 1, 0, 1],  # A sees A (incl. the shared pixel) and the background, not B
                       [1, 1, 1, 1],  # the overlap belongs to both
                       [0, 1, 1, 1],
                       [1, 1, 1, 1]]  # background sees everything


def test_refine_masks_hand_case_and_empty_fallback():
    # 1x4 image: pixels 0,1 attend to each other, pixels 2,3 to each other; A's word attends to 0,1
    self_map = torch.tensor([[[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]]])
    cross = torch.tensor([[[1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.0, 0.8]]])  # (B, N, S)
    boxes = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    masks = refine_masks(self_map, cross, boxes[None].clone(), boxes, clusters=2)
    assert masks[0].int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    # B's word attends nowhere inside its current mask -> its mask is empty -> its box, taken from A
    cross = torch.tensor([[[1.0, 0.0], [0.9, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    current = torch.tensor([[[1, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    masks = refine_masks(self_map, cross, current, boxes, clusters=2)
    assert masks[0].int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]


def test_loss_terms_hand_case():
    probs = torch.zeros(1, 1, 4, 3)  # 4 pixels, keys 0..2; subject A: box = pixels 0,1; context = key 1
    probs[0, 0, :, 1] = torch.tensor([0.5, 0.25, 0.0, 0.125])  # pixel 3 is background
    boxes = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    context = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    fg, bg = foreground_background(probs, boxes, context)
    assert fg.tolist() == [[0.75, 0.0]] and bg.tolist() == [[0.125, 0.0]]
    loss = iou_loss([torch.tensor([[3.0, 1.0]])], [torch.tensor([[1.0, 0.0]])])  # S = 2: iou 3 / (3 + 2) = 0.6
    assert torch.allclose(loss, torch.tensor([[0.16, 0.0]]))


def test_step_size_schedule():
    assert guidance_step_size(8, 2, 0, 15) == 8
    assert guidance_step_size(8, 2, 14, 15) == pytest.approx(2.4)  # the reference never reaches the end value
    assert guidance_step_size(18, 5, 5, 15) == pytest.approx(18 - 13 / 3)


def test_tokens_from_words(sd15):
    tok = sd15.tokenizer
    prompt = "a red square, a blue square"
    assert subject_tokens(tok, prompt, [Subject("red square", LEFT), Subject("blue square", RIGHT)]) == [[2, 3], [6, 7]]
    assert subject_tokens(tok, prompt, [Subject("square", LEFT), Subject("square", RIGHT)]) == [[3], [7]]
    assert filtered_tokens(tok, prompt) == [1, 5]
    assert eos_position(tok, prompt) == 8
    with pytest.raises(ValueError, match="'green square' is not in the prompt.*a red square , a blue square"):
        subject_tokens(tok, prompt, [Subject("green square", LEFT)])


@pytest.mark.parametrize("box, message", [((0.5, 0, 0.4, 1), "x0 < x1"), ((0, 0, 1.2, 1), "x0 < x1"),
                                          ((0, 0, float("nan"), 1), "finite")])
def test_bad_boxes(box, message):
    with pytest.raises(ValueError, match=message):
        Subject("red circle", box)


def test_box_too_small_and_too_many_subjects(sd15):
    with pytest.raises(ValueError, match="covers no cell of the 4x4"):  # up_blocks.1: 4x4 on the tiny model
        BoundedAttention(sd15, PROMPT, [Subject("red circle", (0.0, 0.0, 0.1, 0.1))])
    BoundedAttention(sd15, PROMPT, [Subject("red circle", (0.0, 0.0, 0.3, 0.3))])  # no cell of the 2x2 mid: fine
    words = ["red", "circle", "and", "a", "blue", "square"]  # 6 subjects x 3 clusters > 16 cells of the 4x4 grid
    with pytest.raises(ValueError, match="at most 5 subjects"):
        BoundedAttention(sd15, PROMPT, [Subject(w, (0.0, 0.0, 1.0, 1.0)) for w in words])


def _stock(pipe, **kw):
    return pipe("a red circle and a blue square", num_inference_steps=3, guidance_scale=7.5, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def test_no_subjects_is_the_stock_pipeline(sd15):
    out = bounded(sd15, PROMPT, [], steps=3, seed=0).images
    assert np.array_equal(out, _stock(sd15))


def test_layout_guidance_without_guided_steps_is_stock(sd15):
    """Neutral settings (no guided step, no masks): explicit processors on the loss layers run the fused kernel."""
    before = dict(sd15.unet.attn_processors)
    out = bounded(sd15, PROMPT, _subjects(), BoundedOptions(masks=False, guidance_steps=0), steps=3, seed=0).images
    assert np.array_equal(out, _stock(sd15))
    assert dict(sd15.unet.attn_processors) == before


def test_processors_restored_on_exit_and_on_error(sd15):
    before = dict(sd15.unet.attn_processors)
    hooks = len(sd15.unet._forward_pre_hooks)
    with BoundedAttention(sd15, PROMPT, _subjects()):
        assert dict(sd15.unet.attn_processors) != before
    assert dict(sd15.unet.attn_processors) == before and len(sd15.unet._forward_pre_hooks) == hooks

    def fail(step, iteration, loss):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        bounded(sd15, PROMPT, _subjects(), steps=3, seed=0, callback=fail)
    assert dict(sd15.unet.attn_processors) == before and len(sd15.unet._forward_pre_hooks) == hooks
    assert np.array_equal(_stock(sd15), _stock(sd15))


def test_masks_act_in_the_attention(sd15):
    """Inside the context, a subject's pixels give no attention to the other subject's tokens or to function words,
    background pixels none to subject tokens or the first EOS; the unconditional half is not masked."""
    seen = {}
    with BoundedAttention(sd15, PROMPT, _subjects()) as ba:
        inner = ba.probs

        def record(call, probs):
            if call.is_cross:
                seen[call.name] = probs.detach().clone()
            return inner(call, probs)

        ba.probs = record
        for proc in sd15.unet.attn_processors.values():
            if getattr(proc, "probs_hook", None) is not None:
                proc.probs_hook = record
        _stock(sd15)
    name, probs = next(iter(seen.items()))  # (2, h, N, K) at a 4x4 mask layer
    grid = int(probs.shape[2] ** 0.5)
    boxes = box_masks([LEFT, RIGHT], grid, grid)
    red, blue = ba.tokens
    cond, uncond = probs[1], probs[0]
    assert cond[:, boxes[0]][..., blue].abs().max() == 0 and cond[:, boxes[1]][..., red].abs().max() == 0
    assert cond[:, boxes[0]][..., red].min() > 0
    assert cond[..., ba.hidden].abs().max() == 0
    background = ~boxes.any(0)
    assert cond[:, background][..., [*red, *blue, ba.eos]].abs().max() == 0
    assert uncond[..., ba.hidden].min() > 0


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_guidance_lowers_the_loss(model, request):
    pipe = request.getfixturevalue(model)
    o = BoundedOptions(iterations=1, start_step_size=2e3, end_step_size=2e3, stop_loss=0.0)
    side = pipe.unet.config.sample_size
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    with BoundedAttention(pipe, PROMPT, _subjects(), o) as ba:
        cond = _conditioning(pipe, PROMPT, 1, (side * pipe.vae_scale_factor,) * 2)
        pipe.scheduler.set_timesteps(10)
        t = pipe.scheduler.timesteps[0]
        y = x
        for _ in range(4):
            y = ba.guide(y, 0, t, cond)
        ba.guide(y, 0, t, cond)
    losses = [loss for _, _, loss in ba.losses]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.99 * losses[0], losses
    assert not torch.equal(x, y)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_bounded_end_to_end(model, request):
    pipe = request.getfixturevalue(model)
    before = dict(pipe.unet.attn_processors)
    o = BoundedOptions(guidance_steps=2, iterations=2, refine_from=2, refine_every=1)
    seen = []
    r = bounded(pipe, PROMPT, _subjects(), o, steps=4, seed=1, images=2, callback=lambda *a: seen.append(a))
    assert r.images.shape == (2, 32, 32, 3) and np.isfinite(r.images).all()
    assert r.masks.shape[:2] == (2, 2) and r.masks.dtype == torch.bool
    assert all(r.masks[b, s].any() for b in range(2) for s in range(2))  # never empty: the box is the fallback
    assert [step for step, _, _ in r.losses] == [0, 0, 1, 1] and len(seen) == 4
    assert r.refined == [2, 3]
    assert dict(pipe.unet.attn_processors) == before
    again = bounded(pipe, PROMPT, _subjects(), o, steps=4, seed=1, images=2)
    assert np.array_equal(r.images, again.images)  # reproducible


def test_cli_layout_writes_images_with_recipes_and_remakes_them(sd_folder, tmp_path, capsys):
    from PIL import Image

    from attnmod.cli import main

    out = tmp_path / "layout"
    args = ["layout", "--model", str(sd_folder), "--prompt", PROMPT, "--box", "red circle=0,0.25,0.5,0.75",
            "--box", "blue square=0.5,0.25,1,0.75", "--steps", "4", "--option", "guidance_steps=2",
            "--option", "start_step_size=none", "--out", str(out), "--quiet"]
    assert main(args) == 0
    image = np.asarray(Image.open(out / "image.png"))
    overlay = Image.open(out / "overlay.png")
    assert overlay.width >= 256 and "attnmod_layout" in overlay.text
    info = json.loads(Image.open(out / "image.png").text["attnmod_layout"])
    assert info["method"] == "bounded" and info["subjects"][1] == ["blue square", [0.5, 0.25, 1.0, 0.75]]
    assert info["options"]["guidance_steps"] == 2
    assert main(["layout", "--recipe", str(out / "image.png"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "image.png")), image)
    assert main([*args[:-3], "--method", "none", "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "image.png")), image)


@pytest.mark.parametrize("box, message", [
    ("red circle=0.5,0.2,0.4,0.8", "x0 < x1"), ("red circle=0,0,1.5,1", "x0 < x1"),
    ("red circle 0,0,1,1", "WORDS=X0,Y0,X1,Y1"), ("red circle=0,0,1", "WORDS=X0,Y0,X1,Y1"),
])
def test_cli_layout_bad_boxes_are_one_line_before_loading(box, message, tmp_path, capsys):
    from attnmod.cli import main

    with pytest.raises(SystemExit):
        main(["layout", "--model", str(tmp_path / "no-model"), "--prompt", PROMPT, "--box", box,
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("attnmod layout: error: argument --box")
    assert not (tmp_path / "o").exists()


def test_cli_layout_words_not_in_the_prompt(sd_folder, tmp_path, capsys):
    from attnmod.cli import main

    code = main(["layout", "--model", str(sd_folder), "--prompt", PROMPT, "--box", "green star=0,0,0.5,0.5",
                 "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'green star' is not in the prompt" in err and "a red circle and a blue square" in err
    assert not list((tmp_path / "o").glob("*.png"))


def test_cli_layout_uses_the_embedded_models_blocks_unless_told(tmp_path, capsys):
    from PIL import Image

    from attnmod.cli import main
    from attnmod.defaults import TOY_LAYOUT

    base = ["layout", "--prompt", "a large red circle, a large blue square", "--box", "red circle=0,0,0.5,0.5",
            "--box", "blue square=0.5,0.5,1,1", "--steps", "3", "--option", "guidance_steps=1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    options = json.loads(Image.open(tmp_path / "a" / "image.png").text["attnmod_layout"])["options"]
    assert options["loss_blocks"] == TOY_LAYOUT["loss_blocks"] and options["mask_blocks"] == TOY_LAYOUT["mask_blocks"]
    assert main([*base, "--option", "loss_blocks=none", "--out", str(tmp_path / "b")]) == 0
    options = json.loads(Image.open(tmp_path / "b" / "image.png").text["attnmod_layout"])["options"]
    assert options["loss_blocks"] is None and options["mask_blocks"] == TOY_LAYOUT["mask_blocks"]

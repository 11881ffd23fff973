"""Saved StyleAligned references: computed once, replayed for later batches without running the reference."""

import json
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
from attnmod.methods.style_reference import StyleReference, compute_reference

PROMPTS = ["a red cat", "a blue dog", "a green star"]
RUN = {"steps": 3, "guidance": 5.0, "width": 32, "height": 32}


class UNetRows:
    """Counts UNet calls and the batch rows they evaluate."""

    def __init__(self, pipe):
        self.calls, self.rows, self.pipe = 0, 0, pipe

    def __enter__(self):
        def count(module, args, kwargs):
            self.calls += 1
            self.rows += (args[0] if args else kwargs["sample"]).shape[0]

        self.handle = self.pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("options", [StyleAlignedOptions(), StyleAlignedOptions(adain_values=True,
                                                                                 shared_score_shift=0.5,
                                                                                 share_group_norm=False)])
def test_saved_reference_replays_the_joint_batch(pipe, tmp_path, options):
    """Targets against a saved (and reloaded) reference equal the batch generated together with it: batching
    noise only (measured ~1e-6 on [0, 1] pixels), and the reference image is the one the joint batch makes."""
    joint = generate_style_set(pipe, PROMPTS, seed=3, options=options, **RUN)
    ref = compute_reference(pipe, PROMPTS[0], seed=3, **RUN)
    ref.save(tmp_path / "r.safetensors")
    loaded = StyleReference.load(tmp_path / "r.safetensors")
    with UNetRows(pipe) as count:
        saved = generate_style_set(pipe, PROMPTS[1:], seed=3, options=options, saved_reference=loaded, **RUN)
    assert count.calls == 3 and count.rows == 3 * 2 * 2  # 3 steps, 2 targets x 2 CFG rows: no reference rows
    assert saved.shape == joint.shape and np.array_equal(saved[0], ref.image)
    assert np.abs(saved - joint).max() < 1e-4
    again = generate_style_set(pipe, PROMPTS[1:], seed=3, options=options, saved_reference=loaded, **RUN)
    assert np.array_equal(again, saved)  # the file replays any number of times, bit for bit
    alone = generate_style_set(pipe, PROMPTS[2:], seed=4, options=options, saved_reference=loaded, **RUN)
    assert np.abs(alone[1] - joint[2]).max() < 1e-4  # target 0 of this batch has seed 4 + 1, as image 2 above


def test_inverted_reference_is_saved_without_rerunning_the_inversion(sd):
    ref_image = Image.fromarray((generate_style_set(sd, PROMPTS[:1], **RUN)[0] * 255).round().astype(np.uint8))
    kw = {"reference_image": ref_image, "reference_prompt": "a red cat", **RUN}
    joint = generate_style_set(sd, PROMPTS[1:], seed=2, **kw)
    ref = compute_reference(sd, "a red cat", image=ref_image, **RUN)
    assert ref.info.source == "inverted" and ref.info.seed is None
    with UNetRows(sd) as count:  # no inversion (1 row per step) and no reference rows
        saved = generate_style_set(sd, PROMPTS[1:], seed=2, saved_reference=ref, **RUN)
    assert (count.calls, count.rows) == (3, 3 * 4)
    assert np.abs(saved - joint).max() < 1e-4


def test_features_are_those_of_the_shared_layers_and_norms(sd):
    ref = compute_reference(sd, PROMPTS[0], options=StyleAlignedOptions(blocks="U*"), **RUN)
    assert ref.info.layers and all(n.startswith("up_blocks") for n in ref.info.layers)
    assert len(ref.info.timesteps) == 3 and ref.info.copies == 2 and ref.info.group_norms
    k = ref.tensor(f"0/{ref.info.layers[0]}/k")
    assert k.shape[0] == 2 and k.dim() == 4  # (CFG copies, heads, tokens, head dim)
    with pytest.raises(ValueError, match="has no features for .* saved with blocks='U\\*'"):
        generate_style_set(sd, PROMPTS[1:], saved_reference=ref, **RUN)
    unguided = compute_reference(sd, PROMPTS[0], **{**RUN, "guidance": 1.0})
    assert unguided.info.copies == 1
    joint = generate_style_set(sd, PROMPTS, **{**RUN, "guidance": 1.0})
    assert np.abs(generate_style_set(sd, PROMPTS[1:], saved_reference=unguided, **{**RUN, "guidance": 1.0})
                  - joint).max() < 1e-4


def test_controlnet_targets_with_a_saved_reference(sd):
    """With a saved reference the batch holds targets only: the control images are theirs, nothing is zeroed."""
    controlled = controlnet_pipeline(sd, zero_controlnet(sd))
    ref = compute_reference(sd, PROMPTS[0], **RUN)
    control = [Image.new("RGB", (32, 32), (200, 0, 0))] * 2
    plain = generate_style_set(sd, PROMPTS[1:], saved_reference=ref, **RUN)
    assert np.array_equal(generate_style_set(controlled, PROMPTS[1:], saved_reference=ref, controls=control, **RUN),
                          plain)
    with pytest.raises(ValueError, match="without ControlNet"):
        compute_reference(controlled, PROMPTS[0], **RUN)


def test_replay_restores_processors_and_hooks(sd):
    ref = compute_reference(sd, PROMPTS[0], **RUN)
    processors = dict(sd.unet.attn_processors)
    with style_aligned(sd, images=2, reference=ref):
        assert hook_count(sd.unet) > 0
    with pytest.raises(RuntimeError, match="boom"), style_aligned(sd, images=2, reference=ref):
        raise RuntimeError("boom")
    assert hook_count(sd.unet) == 0 and dict(sd.unet.attn_processors) == processors


def test_runs_that_do_not_fit_the_reference_are_refused_before_work(sd, sdxl, tmp_path):
    ref = compute_reference(sd, PROMPTS[0], **RUN)
    calls = []
    handle = sd.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for change, message in (({"steps": 4}, "made with 3 steps; this run asks for 4"),
                                ({"guidance": 3.0}, "made at guidance 5; this run asks for 3"),
                                ({"width": 48, "height": 48}, "is 32x32; this run makes 48x48")):
            with pytest.raises(ValueError, match=message):
                generate_style_set(sd, PROMPTS[1:], saved_reference=ref, **{**RUN, **change})
        with pytest.raises(ValueError, match="full_attention_share"):
            generate_style_set(sd, PROMPTS[1:], saved_reference=ref,
                               options=StyleAlignedOptions(full_attention_share=True), **RUN)
        with pytest.raises(ValueError, match="options.reference does not apply"):
            generate_style_set(sd, PROMPTS[1:], saved_reference=ref, options=StyleAlignedOptions(reference=1), **RUN)
        with pytest.raises(ValueError, match="not both"):
            generate_style_set(sd, PROMPTS[1:], saved_reference=ref, reference_image=Image.new("RGB", (32, 32)),
                               **RUN)
        euler = type(sd)(**{**sd.components, "scheduler": __import__("diffusers").EulerDiscreteScheduler.from_config(
            sd.scheduler.config)})
        with pytest.raises(ValueError, match="made with DDIMScheduler; this pipeline uses EulerDiscreteScheduler"):
            generate_style_set(euler, PROMPTS[1:], saved_reference=ref, **RUN)
        shifted = type(sd)(**{**sd.components, "scheduler": type(sd.scheduler).from_config(
            sd.scheduler.config, timestep_spacing="trailing")})
        with pytest.raises(ValueError, match="visited other timesteps"):
            generate_style_set(shifted, PROMPTS[1:], saved_reference=ref, **RUN)
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(ValueError, match="no GroupNorm statistics|has no features"):
        generate_style_set(sdxl, PROMPTS[1:], saved_reference=ref, **RUN)


def test_model_is_checked_by_fingerprint_or_name(sd, tmp_path):
    ref = compute_reference(sd, PROMPTS[0], model="tiny", **RUN)
    assert ref.info.model == "tiny" and ref.info.model_id == ""
    ref.check(model="tiny", width=32, height=32, steps=3, guidance=5.0)
    with pytest.raises(ValueError, match="made with the model tiny; this run uses tiny-sdxl"):
        ref.check(model="tiny-sdxl")
    toy = compute_reference(sd, PROMPTS[0], model="toy", **RUN)  # recorded as the embedded model (by fingerprint)
    assert toy.info.model_id
    with pytest.raises(ValueError, match=f"\\(id {toy.info.model_id}\\); this run uses tiny"):
        toy.check(model="tiny")


def test_corrupt_and_foreign_files_are_one_line_errors(sd, tmp_path):
    from safetensors.torch import save_file

    ref = compute_reference(sd, PROMPTS[0], **RUN)
    good = ref.save(tmp_path / "r.safetensors")
    data = good.read_bytes()
    cases = {"missing.safetensors": None, "junk.safetensors": b"not a safetensors file at all",
             "truncated.safetensors": data[:-100]}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a byte of the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"]["info"] = header["__metadata__"]["info"].replace('"width": 32', '"width": "32"')
    text = json.dumps(header).encode()
    (tmp_path / "badinfo.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len:])
    for name, message in (("missing", "no saved reference at"), ("junk", "not a readable saved reference"),
                          ("truncated", "not a readable saved reference"),
                          ("foreign", "not a saved StyleAligned reference"),
                          ("flipped", "corrupt saved reference \\(its tensors do not match their checksum\\)"),
                          ("badinfo", "corrupt saved reference \\(info field width")):
        with pytest.raises(ValueError, match=message) as e:
            StyleReference.load(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)


def test_cli_save_then_reuse_the_reference(tmp_path, capsys):
    """attnmod style --save-reference, then --reference: the second batch does not run the reference, equals
    the targets made together with it, and any of its PNGs remakes it; misfits are one-line errors."""
    from attnmod.cli import main

    ref, target = "a large red circle on the left, on a striped yellow background", "a small blue star on the right"
    run = ["style", "--steps", "3", "--seed", "4"]
    r = tmp_path / "ref.safetensors"
    assert main([*run, "--prompt", ref, "--prompt", target, "--save-reference", str(r), "--out", str(tmp_path / "a")]) == 0
    assert "saved the reference to" in capsys.readouterr().out
    assert main([*run, "--prompt", ref, "--prompt", target, "--out", str(tmp_path / "joint")]) == 0
    assert main([*run, "--prompt", target, "--reference", str(r), "--out", str(tmp_path / "b")]) == 0

    def pixels(folder, name):
        return np.asarray(Image.open(tmp_path / folder / name), dtype=np.float32) / 255

    for name in ("00.png", "01.png"):
        assert np.array_equal(pixels("b", name), pixels("a", name))
        assert np.abs(pixels("b", name) - pixels("joint", name)).max() <= 1 / 255  # 8-bit rounding of ~1e-6
    info = json.loads(Image.open(tmp_path / "b" / "01.png").text["attnmod_style"])
    assert info["reference_mode"] == "file" and info["reference_file"] == str(r.resolve())
    assert main(["style", "--recipe", str(tmp_path / "b" / "01.png"), "--out", str(tmp_path / "again")]) == 0
    assert main(["style", "--recipe", str(tmp_path / "a" / "01.png"), "--out", str(tmp_path / "again_a")]) == 0
    for folder in ("again", "again_a"):
        assert np.array_equal(pixels(folder, "01.png"), pixels("b", "01.png"))
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    for extra, message in ((["--model", "tiny"], "made with the model toy \\(id [0-9a-f]+\\); this run uses tiny"),
                           (["--steps", "5"], "made with 3 steps; this run asks for 5"),
                           (["--size", "32x32"], "is 64x64; this run makes 32x32"),
                           (["--ref-prompt", ref], "no --ref-image, --ref-prompt or --save-reference"),
                           (["--save-reference", str(tmp_path / "x.safetensors")], "no --ref-image"),
                           (["--reference", str(bad)], "not a readable saved reference")):
        args = ["style", "--prompt", target, "--reference", str(r), "--out", str(tmp_path / "x"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(re.findall(message, err)) == 1 and err.count("\n") == 1, err
    assert main(["style", "--prompt", target, "--save-reference", str(tmp_path / "r.png"), "--out",
                 str(tmp_path / "y")]) == 2
    assert "attnmod writes .safetensors files" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

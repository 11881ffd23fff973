import json
import os
import shutil
import sys

import pytest
from PIL import Image

from attnmod.cli import main
from attnmod.loading import ModelLoadError, is_sdxl_checkpoint, load_pipeline


def test_blocks_lists_every_block(sd_folder, capsys):
    assert main(["blocks", "--model", str(sd_folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 32
    assert "U1A1A2  up_blocks.1.attentions.1.transformer_blocks.0.attn2  cross" in lines
    assert main(["blocks", "--model", "tiny-sdxl", "--select", "U0A1*"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 * 2  # 3 transformer blocks x attn1/attn2


def test_generate_writes_a_png_with_its_recipe_and_regenerates_it(sd_folder, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(sd_folder), "--prompt", "a red cat", "--seed", "3", "--steps", "3",
            "--size", "32x32", "--mod", "U1A1A2=-5:0.2", "--mod", "M0A0*=2", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as im:
        params = im.text["parameters"]
        recipe = json.loads(im.text["attnmod"])
    assert params.startswith("a red cat\nNegative prompt: \nSteps: 3, ")
    assert 'AttnMod: "M0A0A1=2:0 M0A0A2=2:0 U1A1A2=-5:0.2"' in params
    assert recipe["seed"] == 3 and len(recipe["mods"]) == 3
    again = tmp_path / "b.png"
    assert main(["generate", "--recipe", str(out), "--out", str(again)]) == 0  # model, seed, mods from the PNG
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


def test_scan_end_to_end_and_resume(sd_folder, tmp_path, capsys):
    out = tmp_path / "scan"
    args = ["scan", "--model", str(sd_folder), "--prompt", "a red cat", "--seed", "0", "--block", "U1A1A2",
            "--start", "-20:50:3", "--rate", "-1:1:3", "--steps", "2", "--size", "32x32", "--batch-size", "4",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "scan: 12 tiles (12 distinct images) x 2 steps = 24 denoising steps; x=start, y=rate" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["tiles"]) == 12 and (out / "grid.png").exists()
    assert main(args) == 0
    assert "rendered 0 of 12 images (12 already done)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--block", "U9A1A2"], "unknown attention block 'U9A1A2'"),
    (["--start", "1:2"], "malformed range"),
    (["--setting", "1:x"], "malformed schedule"),
])
def test_bad_scan_input_is_one_clear_line_and_writes_nothing(sd_folder, tmp_path, capsys, args, message):
    out = tmp_path / "scan"
    code = main(["scan", "--model", str(sd_folder), "--prompt", "p", "--steps", "2", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_size_is_rejected(sd_folder, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(sd_folder), "--prompt", "p", "--size", "30x32", "--out", "x.png"])
    assert e.value.code == 2 and "multiples of 8" in capsys.readouterr().err


def test_missing_and_corrupt_models(sd_folder, tmp_path, capsys):
    assert main(["blocks", "--model", str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["blocks", "--model", str(empty)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_pipeline(str(broken))
    assert main(["blocks", "--model", str(tmp_path / "model.safetensors")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_single_file_checkpoints_are_routed_by_their_keys(tmp_path):
    import torch
    from safetensors.torch import save_file

    sd15, sdxl = tmp_path / "sd15.safetensors", tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, sd15)
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, sdxl)
    assert not is_sdxl_checkpoint(sd15) and is_sdxl_checkpoint(sdxl)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_pipeline(str(corrupt))


def test_folder_loads_through_the_real_path(sd_folder, sd):
    pipe = load_pipeline(str(sd_folder), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for a, b in zip(pipe.unet.parameters(), sd.unet.parameters(), strict=True):
        assert torch_equal(a, b)


def torch_equal(a, b):
    import torch

    return torch.equal(a.detach(), b.detach())


def test_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load model 'nobody/no-such-model'"):
        load_pipeline("nobody/no-such-model")


def test_sdxl_folder_loads_and_lists_its_blocks(sdxl, tmp_path, capsys):
    sdxl.save_pretrained(tmp_path / "xl", safe_serialization=True)
    assert main(["blocks", "--model", str(tmp_path / "xl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 56 and lines[0].startswith("D1A0T0A1  down_blocks.1.attentions.0.transformer_blocks.0.attn1")


def test_unknown_words_for_the_embedded_model_list_its_vocabulary(tmp_path, capsys):
    code = main(["generate", "--prompt", "a large zebra in the center", "--out", str(tmp_path / "z.png")])
    err = capsys.readouterr().err
    assert code == 2 and "does not know: zebra" in err and "vocabulary" in err
    assert not (tmp_path / "z.png").exists()


def test_loading_the_embedded_model_prints_nothing_in_a_fresh_process():
    """The library, used from Python: no loading bars, no warning about torchvision (not a dependency)."""
    import subprocess

    code = "from attnmod.loading import load_pipeline; load_pipeline(None)"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # conftest sets it; users don't
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


@pytest.mark.parametrize("command", ["scan", "influence", "strategy"])
def test_ray_workers_without_ray_is_an_error_not_ignored(command, tmp_path, capsys):
    out = tmp_path / ("o.png" if command == "strategy" else "o")
    argv = [command, "--model", "tiny", "--prompt", "a red cat", "--ray-workers", "2", "--out", str(out)]
    assert main(argv) == 2
    assert "--ray-workers needs --ray" in capsys.readouterr().err
    assert not out.exists()

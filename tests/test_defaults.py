import json
import shutil

from attnmod import load_pipeline
from attnmod.defaults import TOY_MAPS_BLOCKS, model_defaults


def test_embedded_model_uses_its_measured_defaults():
    d = model_defaults(load_pipeline("toy", device="cpu"))
    assert (d["steps"], d["guidance"], d["width"], d["height"]) == (20, 3.0, 64, 64)
    assert d["maps_blocks"] == TOY_MAPS_BLOCKS == "D0*+U3*"


def test_other_models_get_diffusers_values_unless_their_folder_says_otherwise(sd, sd_folder, tmp_path):
    size = sd.unet.config.sample_size * sd.vae_scale_factor
    assert model_defaults(sd) == {"steps": 30, "guidance": 7.5, "width": size, "height": size, "maps_blocks": "all"}
    folder = tmp_path / "model"
    shutil.copytree(sd_folder, folder)
    (folder / "attnmod_defaults.json").write_text(json.dumps({"steps": 7, "maps_blocks": "U*"}))
    d = model_defaults(load_pipeline(str(folder), device="cpu"))
    assert (d["steps"], d["guidance"], d["maps_blocks"]) == (7, 7.5, "U*")


def test_maps_cli_captures_the_models_default_blocks_unless_told(sd_folder, tmp_path, monkeypatch):
    import attnmod.maps
    from attnmod.cli import main

    folder = tmp_path / "model"
    shutil.copytree(sd_folder, folder)
    (folder / "attnmod_defaults.json").write_text(json.dumps({"maps_blocks": "U*"}))
    seen, real = [], attnmod.maps.trace

    def spy(pipe, blocks="all", **kw):
        seen.append(blocks)
        return real(pipe, blocks=blocks, **kw)

    monkeypatch.setattr(attnmod.maps, "trace", spy)
    common = ["maps", "--model", str(folder), "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
              "--segments", "2"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--blocks", "D*", "--out", str(tmp_path / "b")]) == 0
    assert seen == ["U*", "D*"]


def test_the_layout_fine_tune_is_a_second_embedded_model_with_the_same_parts_but_its_own_weights(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from attnmod.cli import main
    from attnmod.defaults import TOY_LAYOUT
    from attnmod.loading import EMBEDDED, model_fingerprint, model_reference

    toy, tuned = load_pipeline("toy", device="cpu"), load_pipeline("toy-layout", device="cpu")
    assert model_defaults(tuned) == model_defaults(toy) and model_defaults(tuned)["layout"] == TOY_LAYOUT
    same = [(toy.vae, tuned.vae)]  # the fine-tune kept the VAE; the UNet and the text encoder moved
    assert all(torch.equal(a, b) for x, y in same for a, b in zip(x.state_dict().values(), y.state_dict().values(),
                                                                   strict=True))
    assert not torch.equal(toy.unet.conv_in.weight, tuned.unet.conv_in.weight)
    assert toy.tokenizer("a red circle").input_ids == tuned.tokenizer("a red circle").input_ids
    assert model_reference("toy-layout") == "toy-layout" and EMBEDDED["toy-layout"].is_dir()
    assert model_fingerprint("toy-layout") not in ("", model_fingerprint("toy"))
    # through the CLI: the model is recorded by its alias and replayed from it
    args = ["generate", "--model", "toy-layout", "--prompt", "a large red circle, a small blue square", "--steps", "3",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "--recipe", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    assert main([*args[:2], "toy", *args[3:], "--out", str(tmp_path / "c.png")]) == 0
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "c.png")))

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

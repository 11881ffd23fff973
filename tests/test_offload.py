"""AttnMod, maps and StyleAligned under diffusers' CPU offload: accelerate's hooks (installed with
``device="cpu"`` here, so they run without a GPU) wrap the same modules attnmod hooks; the images and maps must
be the ones of the pipeline without offload. ``--offload`` itself stays CUDA-only (on a CPU it saves nothing).
Sequential offload to a CPU fails inside accelerate for the stock pipeline too (accelerate 1.15, torch 2.13: a
parameter rebuilt from the meta device), so it is left to a GPU."""

import numpy as np
import pytest
import torch
from conftest import hook_count, run

from attnmod import Schedule, load_pipeline, modify
from attnmod.maps import trace
from attnmod.methods.style_aligned import StyleAlignedOptions, style_aligned

MODS = {"U1*": Schedule(-5, 0.5), "M0A0A2": Schedule(3.0)}


def _all(pipe):
    with modify(pipe, MODS):
        modded = run(pipe)
    with trace(pipe) as maps:
        run(pipe)
    with style_aligned(pipe, images=2, options=StyleAlignedOptions()):
        styled = run(pipe, prompt=["a red cat", "a blue house"])
    return {"stock": run(pipe), "attnmod": modded, "maps": maps.cross, "style": styled}


@pytest.fixture(scope="module")
def plain():
    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return _all(pipe)


def test_attnmod_maps_and_style_aligned_give_the_same_results_under_model_cpu_offload(plain):
    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")  # accelerate's hooks are really there
    hooks = hook_count(pipe.unet)
    got = _all(pipe)
    assert hook_count(pipe.unet) == hooks  # every intervention left the offload hooks as it found them
    for key in ("stock", "attnmod", "style"):
        assert np.allclose(got[key], plain[key], atol=1e-5), key
    assert not np.allclose(got["attnmod"], got["stock"], atol=1e-3)  # the modification really took effect
    assert torch.allclose(got["maps"], plain["maps"], atol=1e-5)

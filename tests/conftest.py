import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

from attnmod.tiny import tiny_sd15, tiny_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def sd():
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sdxl():
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory, sd):
    """The tiny SD1.5 pipeline saved as a diffusers folder (exercises the real loading path)."""
    folder = tmp_path_factory.mktemp("tiny-sd15")
    sd.save_pretrained(folder, safe_serialization=True)
    return folder


def run(pipe, prompt="a red cat", steps=3, seed=0, **kw):
    """A stock pipeline call returning (N, H, W, 3) float images."""
    kw.setdefault("guidance_scale", 5.0)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    with torch.inference_mode():
        out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="np", **kw)
    return np.asarray(out.images)


def hook_count(unet) -> int:
    """Forward hooks anywhere in the UNet (an intervention must leave none behind)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


@pytest.fixture(scope="session")
def sd3():
    from attnmod.dit.tiny import tiny_sd3

    return tiny_sd3()


@pytest.fixture(scope="session")
def flux():
    from attnmod.dit.tiny import tiny_flux

    return tiny_flux()

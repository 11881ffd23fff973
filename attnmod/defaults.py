"""Per-model default settings (steps, guidance, size, maps blocks) when the user gives none."""

from __future__ import annotations

import json
from pathlib import Path

from .loading import EMBEDDED

# The embedded model's word maps localise from its 16x16-latent blocks (32/32 images) and blur when its
# 2x2-8x8 blocks are summed in (27/32): benchmarks/maps_eval.py, docs/attnmod.md.
TOY_MAPS_BLOCKS = "D0*+U3*"
# Bounded Attention / layout guidance on the embedded model: the reference's rule picks its 2x2-4x4 blocks (the
# decoder's coarsest level: 16-pixel cells of a 64-pixel image, finer than most of its objects' boxes allow), so it
# reads the 8x8 decoder blocks instead (benchmarks/layout_eval.py, docs/attnmod.md).
TOY_LAYOUT = {"loss_blocks": "U2*", "mask_blocks": "U2*"}


def model_defaults(pipe) -> dict:
    """Steps, guidance, native size and the blocks ``attnmod maps`` captures: the model folder's
    ``attnmod_defaults.json`` if it has one, the measured defaults of the embedded toy model
    (``toy.evaluate``, ``TOY_MAPS_BLOCKS``), else diffusers' usual values and every block."""
    from .dit import denoiser, is_dit, native_size

    size = native_size(pipe)
    defaults = {"steps": 30, "guidance": 7.5, "width": size, "height": size, "maps_blocks": "all"}
    if is_dit(pipe):  # diffusers' defaults: SD3 28 steps at 7.0, FLUX 28 steps at embedded guidance 3.5
        flux = hasattr(denoiser(pipe), "single_transformer_blocks")
        defaults.update(steps=28, guidance=3.5 if flux else 7.0)
    folder = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if folder and Path(folder).resolve() in {p.resolve() for p in EMBEDDED.values()}:  # toy, toy-layout
        from .toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

        defaults.update(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, maps_blocks=TOY_MAPS_BLOCKS,
                        native_size_only=True,  # trained at 64x64 only: copies of the object at 128, blank at 32
                        # its grammar has no shared object noun: an empty prompt, AdaIN over the whole latent
                        transfer={"prompt": "", "adain": "plain"}, layout=dict(TOY_LAYOUT))
    path = Path(folder) / "attnmod_defaults.json" if folder else None
    if path is not None and path.is_file():
        defaults.update(json.loads(path.read_text()))
    return defaults

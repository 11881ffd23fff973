"""Per-model default sampling settings (steps, guidance, size) when the user gives none."""

from __future__ import annotations

import json
from pathlib import Path

from .loading import EMBEDDED_MODEL


def model_defaults(pipe) -> dict:
    """Steps, guidance and size: the model folder's ``attnmod_defaults.json`` if it has one, the
    measured defaults of the embedded toy model (``toy.evaluate``), else diffusers' usual values."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    defaults = {"steps": 30, "guidance": 7.5, "width": size, "height": size}
    folder = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if folder and Path(folder).resolve() == EMBEDDED_MODEL.resolve():
        from .toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

        defaults.update(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE)
    path = Path(folder) / "attnmod_defaults.json" if folder else None
    if path is not None and path.is_file():
        defaults.update(json.loads(path.read_text()))
    return defaults

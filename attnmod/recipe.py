"""Recipes: every setting that makes an image, written into its PNG so it can be regenerated.

Two text chunks: ``parameters`` in Automatic1111's format (readable by tools artists use) and
``attnmod`` holding our JSON, which ``Recipe.from_png`` reads back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .schedule import Schedule

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """One image: prompt, seed, sampling settings, and the AttnMod schedule of each modified block."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    model: str = "toy"
    scheduler: str = ""  # scheduler class name; "" = the model's own
    mods: tuple[tuple[str, Schedule], ...] = field(default=())  # (full block name, schedule), sorted
    encoder_weights: tuple[float, ...] = ()  # weight of each text encoder's part; () = all 1 (SDXL: 2)

    def __post_init__(self):
        mods = tuple(sorted((n, s) for n, s in dict(self.mods).items() if not s.is_neutral))
        object.__setattr__(self, "mods", mods)
        weights = tuple(float(w) for w in self.encoder_weights)
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"encoder weights must be finite, got {weights}")
        object.__setattr__(self, "encoder_weights", () if all(w == 1.0 for w in weights) else weights)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for side in (self.width, self.height):
            if side <= 0 or side % 8:
                raise ValueError(f"image size must be a positive multiple of 8, got {self.width}x{self.height}")

    def with_mods(self, mods: dict[str, Schedule]) -> Recipe:
        return replace(self, mods=tuple(mods.items()))

    @property
    def mods_dict(self) -> dict[str, Schedule]:
        return dict(self.mods)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mods"] = {name: s.to_dict() for name, s in self.mods}
        d["encoder_weights"] = list(self.encoder_weights)
        if not self.encoder_weights:
            del d["encoder_weights"]  # keeps the keys of recipes that do not use it stable
        return {"version": RECIPE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = {k: v for k, v in d.items() if k != "version"}
        mods = tuple((n, Schedule.from_dict(s)) for n, s in d.pop("mods", {}).items())
        weights = tuple(d.pop("encoder_weights", ()))
        return cls(**d, mods=mods, encoder_weights=weights)

    @property
    def key(self) -> str:
        """Content hash: equal recipes give equal images (and share one tile file)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def a1111_parameters(self, short_names: dict[str, str] | None = None) -> str:
        short = short_names or {}
        fields = [
            f"Steps: {self.steps}", f"Sampler: {self.scheduler or 'default'}", f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}", f"Size: {self.width}x{self.height}", f"Model: {self.model}",
        ]
        if self.mods:
            mods = " ".join(f"{short.get(n, n)}={s.to_text()}" for n, s in self.mods)
            fields.append(f'AttnMod: "{mods}"')
        if self.encoder_weights:
            fields.append(f"Text encoder weights: {','.join(f'{w:g}' for w in self.encoder_weights)}")
        return f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n" + ", ".join(fields)

    @classmethod
    def from_png(cls, path: str | Path) -> Recipe:
        with Image.open(path) as im:
            text = im.text.get("attnmod") if hasattr(im, "text") else None
        if text is None:
            raise ValueError(f"{path} carries no attnmod recipe")
        return cls.from_dict(json.loads(text))


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, 3) float in [0, 1] -> 8-bit RGB image."""
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def save_png(image: np.ndarray | Image.Image, path: str | Path, recipe: Recipe,
             short_names: dict[str, str] | None = None, extra: dict | None = None) -> Path:
    """Write ``image`` with its recipe (and ``extra`` JSON text chunks), atomically: a crash leaves
    the old file or none, never half a file."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", recipe.a1111_parameters(short_names))
    info.add_text("attnmod", json.dumps(recipe.to_dict()))
    for key, value in (extra or {}).items():
        info.add_text(key, json.dumps(value))
    return atomic_write(path, lambda f: pil.save(f, format="PNG", pnginfo=info))


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(path: str | Path, image: Image.Image) -> Path:
    """A plain PNG (sheets, grids), written atomically."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))

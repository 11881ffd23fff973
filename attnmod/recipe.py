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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .guards import SEED_MAX
from .schedule import Schedule

RECIPE_VERSION = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_MAX_JSON_BYTES = 16 << 20  # a recipe JSON is a few kB; anything this big is not one


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
    model_id: str = ""  # a short hash of a local model's weights (``loading.model_fingerprint``); "" = unknown
    device: str = ""  # where it was rendered ("cuda:0", "cpu"); "" = unknown. The image can differ elsewhere
    dtype: str = ""  # "float16", "float32", ...; "" = unknown

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
        for name in ("model_id", "device", "dtype"):  # likewise for recipes made before they were recorded
            if not d[name]:
                del d[name]
        return {"version": RECIPE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe ``to_dict`` wrote; ValueError (one line, naming the field) for anything else."""
        _check_recipe_dict(d)
        d = {k: v for k, v in d.items() if k != "version"}
        mods = tuple((n, _schedule(n, s)) for n, s in d.pop("mods", {}).items())
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
        if self.model_id:
            fields.append(f"Model hash: {self.model_id}")
        if self.mods:
            mods = " ".join(f"{short.get(n, n)}={s.to_text()}" for n, s in self.mods)
            fields.append(f'AttnMod: "{mods}"')
        if self.encoder_weights:
            fields.append(f"Text encoder weights: {','.join(f'{w:g}' for w in self.encoder_weights)}")
        return f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n" + ", ".join(fields)

    @classmethod
    def from_png(cls, path: str | Path) -> Recipe:
        """The recipe in the ``attnmod`` chunk of a PNG attnmod wrote (read without decoding the pixels,
        so a truncated file still gives it)."""
        text = (png_text(path) or {}).get("attnmod")
        if text is None:
            raise ValueError(f"{path} is not a PNG written by attnmod (no attnmod recipe chunk)")
        return cls._from_json_text(text, path, f"{path}: its attnmod recipe chunk")

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """The recipe of a PNG attnmod wrote or of a recipe JSON file, told apart by content."""
        path = Path(path)
        head = _read_head(path, "recipe file (give a PNG attnmod wrote or a recipe JSON)")
        if head.startswith(PNG_SIGNATURE):
            return cls.from_png(path)
        if path.suffix.lower() in _IMAGE_SUFFIXES or _is_image_data(head):
            raise ValueError(f"{path} is not a PNG written by attnmod (no attnmod recipe chunk)")
        return cls._from_json_text(_read_text(path), path, str(path))

    @classmethod
    def _from_json_text(cls, text: str, path: str | Path, what: str) -> Recipe:
        data = _parse_json(text, what)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


_INT_FIELDS = ("seed", "steps", "width", "height")
_STR_FIELDS = ("prompt", "negative_prompt", "model", "scheduler", "model_id", "device", "dtype")
_SCHEDULE_KEYS = ("start", "rate", "accel", "values")


def _show(value) -> str:
    """A JSON value as the user wrote it, cut short for a one-line message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_recipe_dict(d) -> None:
    """Keys and JSON types of a recipe dict (the values' ranges are ``Recipe``'s own checks)."""
    if not isinstance(d, dict):
        raise ValueError(f"a recipe must be a JSON object {{...}}, got {_show(d)}")
    valid = ["version", *(f.name for f in fields(Recipe))]
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(f"recipe has an unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
    if "prompt" not in d:
        raise ValueError("recipe has no prompt")
    version = d.get("version", RECIPE_VERSION)
    if not _is_int(version):
        raise ValueError(f"recipe field version must be an integer, got {_show(version)}")
    if version > RECIPE_VERSION:
        raise ValueError(f"recipe version {version} is newer than this attnmod reads ({RECIPE_VERSION})")
    checks = [(_STR_FIELDS, lambda v: isinstance(v, str), "a string"), (_INT_FIELDS, _is_int, "an integer"),
              (("guidance",), _is_number, "a finite number"), (("mods",), lambda v: isinstance(v, dict), "an object"),
              (("encoder_weights",), lambda v: isinstance(v, list) and all(map(_is_number, v)),
               "a list of finite numbers")]
    for names, ok, kind in checks:
        for name in names:
            if name in d and not ok(d[name]):
                raise ValueError(f"recipe field {name} must be {kind}, got {_show(d[name])}")
    if not 0 <= d.get("seed", 0) <= SEED_MAX:
        raise ValueError(f"recipe field seed must be from 0 to 2**64 - 1, got {d['seed']}")


def _schedule(block, d) -> Schedule:
    """The schedule of ``block`` in a recipe's ``mods``."""
    where = f"recipe mod {block!r}"
    if not isinstance(d, dict):
        raise ValueError(f'{where} must be an object like {{"start": -5, "rate": 0.2}}, got {_show(d)}')
    unknown = [k for k in d if k not in _SCHEDULE_KEYS]
    if unknown:
        raise ValueError(f"{where} has an unknown key {unknown[0]!r}; valid keys: {', '.join(_SCHEDULE_KEYS)}")
    for key in ("start", "rate", "accel"):
        if key in d and not _is_number(d[key]):
            raise ValueError(f"{where}: {key} must be a finite number, got {_show(d[key])}")
    if "values" in d and not (isinstance(d["values"], list) and all(map(_is_number, d["values"]))):
        raise ValueError(f"{where}: values must be a list of finite numbers, got {_show(d['values'])}")
    try:
        return Schedule.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ValueError(f"{what} is not valid JSON (nested too deeply)") from None


def _read_head(path: Path, what: str) -> bytes:
    """The first bytes of the file at ``path``; ValueError if it is missing, a folder or unreadable."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what}")
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def _read_text(path: Path) -> str:
    """A recipe JSON file's text; ValueError if it is too big, unreadable or not UTF-8."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError(f"{path} is too big to be a recipe JSON ({path.stat().st_size} bytes)")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither a PNG written by attnmod nor a recipe JSON (not UTF-8 text)") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def _is_image_data(head: bytes) -> bool:
    """True for the signatures of the image formats people may pass instead of an attnmod PNG."""
    return head.startswith((b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")) or (
        head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def png_text(path: str | Path) -> dict[str, str] | None:
    """The text chunks of the PNG at ``path`` that come before its image data (where attnmod writes
    them), read without decoding the pixels, so a truncated file still gives them. None if the file
    is not a PNG; ValueError (one line) if it is missing, a folder, unreadable or a broken PNG."""
    path = Path(path)
    if not _read_head(path, "PNG").startswith(PNG_SIGNATURE):
        return None
    try:
        with Image.open(path, formats=["PNG"]) as im:
            return {k: str(v) for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read {path}: {reason}") from None


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, 3) float in [0, 1] -> 8-bit RGB image."""
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def save_png(image: np.ndarray | Image.Image, path: str | Path, recipe: Recipe,
             short_names: dict[str, str] | None = None, extra: dict | None = None, compress_level: int = 6) -> Path:
    """Write ``image`` with its recipe (and ``extra`` JSON text chunks), atomically: a crash leaves
    the old file or none, never half a file. ``compress_level``: zlib 0-9 (lossless; 6 is Pillow's default)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", recipe.a1111_parameters(short_names))
    info.add_text("attnmod", json.dumps(recipe.to_dict()))
    for key, value in (extra or {}).items():
        info.add_text(key, json.dumps(value))
    return atomic_write(path, lambda f: pil.save(f, format="PNG", pnginfo=info, compress_level=compress_level))


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place.

    The file gets the mode a plain ``open`` would give (``0o666`` less the umask), not the temp file's
    0600. An ``OSError`` (disk full, no permission, ...) is raised naming ``path`` in its ``filename``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    return path


def current_umask() -> int:
    """The process's umask: read from /proc where there is one (no change, so no race with threads
    creating files), else set to 0o077 and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_image(path: str | Path, image: Image.Image) -> Path:
    """A plain PNG (sheets, grids), written atomically."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))

"""Procedural shapes dataset with ground truth: the images the toy model is trained and measured on.

Every image is 64×64 RGB and holds one or two objects on a patterned background. A seed fixes
everything (``sample(seed)``), so an image comes with its caption, per-object masks and attributes.

Attributes
    shape      circle, square, triangle, star
    colour     red, orange, yellow, green, cyan, blue, purple, white  (the 8 ``COLORS``)
    size       small, large
    position   left, right, top, bottom, center
    background a colour (one of the 8, never an object's colour) and a pattern:
               plain, striped, dotted, checkered (the pattern is a darker shade of the colour)
    style      flat (plain fill), outlined (fill with a black outline), shaded (fill darkening
               from top-left to bottom-right) — how everything is drawn, independent of content

Caption grammar (every word is one token of the toy model's tokenizer)::

    caption    := object [", " object] [", " background] [", " style]
    object     := "a " SIZE " " COLOR " " SHAPE " " PLACE
    PLACE      := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    background := "on a " PATTERN " " COLOR " background"
    style      := STYLE " style"

e.g. ``"a large red circle on the left, a small blue star on the right, on a striped yellow
background, outlined style"``. Two objects are always on opposite sides (left/right or
top/bottom) and have different colours. ``caption(scene)`` writes the full form; training also
drops the background or style clause now and then (``caption(scene, background=False)``) so short
prompts work. ``parse_caption`` reads any caption of the grammar back into attributes (``None``
where a clause is absent); ``check_prompt`` rejects words outside ``vocabulary()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
_SS = 2  # supersampling factor for anti-aliased drawing

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 40),
    "green": (30, 170, 50),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 220),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
PATTERNS = ("plain", "striped", "dotted", "checkered")
STYLES = ("flat", "outlined", "shaded")
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}
ANCHORS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
RADIUS = {"small": 7.0, "large": 11.0}  # half the side of the object's bounding box, pixels
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
PATTERN_SHADE = 0.65  # pattern colour = background colour × this
SHADE_RANGE = (1.0, 0.6)  # shaded style: fill multiplier at the top-left / bottom-right corner
_FILLER = ("a", "on", "the", "at", "in", "background", "style")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str  # colour name
    pattern: str
    style: str


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    masks: np.ndarray  # (n_objects, 64, 64) bool, visible pixels of each object
    scene: Scene
    caption: str


@dataclass(frozen=True)
class Parsed:
    """Attributes read from a caption; ``None`` where the caption leaves them out."""

    objects: tuple[Obj, ...]
    background: str | None = None
    pattern: str | None = None
    style: str | None = None


def vocabulary() -> list[str]:
    """Every word the grammar uses (the toy tokenizer maps each to one token)."""
    words = [*_FILLER, *SIZES, *COLORS, *SHAPES, *POSITIONS, *PATTERNS, *STYLES]
    return list(dict.fromkeys(words))


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def check_prompt(text: str) -> str:
    """Return ``text`` if every word is in the vocabulary, else raise ``ValueError`` listing it."""
    unknown = [w for w in dict.fromkeys(words_of(text)) if w not in set(vocabulary())]
    if unknown or re.search(r"[^a-zA-Z ,]", text):
        bad = ", ".join(unknown) if unknown else "characters other than letters, spaces and commas"
        raise ValueError(
            f"the toy model does not know: {bad}. Its vocabulary is: {' '.join(vocabulary())}. "
            'Example: "a large red circle on the left, on a striped yellow background, outlined style"'
        )
    return text


# --- sampling -------------------------------------------------------------------------------------

def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    if n == 1:
        positions: tuple[str, ...] = (POSITIONS[rng.integers(len(POSITIONS))],)
    elif n == 2:
        positions = PAIRS[rng.integers(len(PAIRS))]
    else:
        raise ValueError(f"n_objects must be 1 or 2, got {n}")
    names = list(COLORS)
    colors = [names[i] for i in rng.permutation(len(names))[: n + 1]]  # all distinct
    objects = tuple(
        Obj(SHAPES[rng.integers(len(SHAPES))], colors[i], SIZES[rng.integers(len(SIZES))], positions[i])
        for i in range(n)
    )
    return Scene(objects, colors[n], PATTERNS[rng.integers(len(PATTERNS))], STYLES[rng.integers(len(STYLES))])


def sample(seed: int, n_objects: int | None = None) -> Sample:
    """The image, masks, scene and full caption drawn from ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, n_objects)
    jitter = rng.uniform(-3, 3, size=(len(scene.objects), 2))
    image, masks = render(scene, jitter)
    return Sample(image, masks, scene, caption(scene))


def caption(scene: Scene | Parsed, background: bool = True, style: bool = True) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} {PLACES[o.position]}" for o in scene.objects]
    if background and scene.background is not None:
        parts.append(f"on a {scene.pattern} {scene.background} background")
    if style and scene.style is not None:
        parts.append(f"{scene.style} style")
    return ", ".join(parts)


_OBJ_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(PLACES.values())})"
)
_BG_RE = re.compile(rf"on a ({'|'.join(PATTERNS)}) ({'|'.join(COLORS)}) background")
_STYLE_RE = re.compile(rf"({'|'.join(STYLES)}) style")


def parse_caption(text: str) -> Parsed:
    """Read a caption of the grammar back into attributes; ``ValueError`` if it does not parse."""
    check_prompt(text)
    place_to_pos = {v: k for k, v in PLACES.items()}
    objects, background, pattern, style = [], None, None, None
    for clause in (c.strip() for c in " ".join(words_of_with_commas(text)).split(",")):
        if m := _OBJ_RE.fullmatch(clause):
            objects.append(Obj(m[3], m[2], m[1], place_to_pos[m[4]]))
        elif (m := _BG_RE.fullmatch(clause)) and background is None:
            pattern, background = m[1], m[2]
        elif (m := _STYLE_RE.fullmatch(clause)) and style is None:
            style = m[1]
        else:
            raise ValueError(f"cannot parse clause {clause!r} of {text!r}; see attnmod.toy.dataset for the grammar")
    return Parsed(tuple(objects), background, pattern, style)


def words_of_with_commas(text: str) -> list[str]:
    return re.findall(r"[a-z]+|,", text.lower())


# --- drawing --------------------------------------------------------------------------------------

def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` centred at (cx, cy) inside a box of half-side r (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.05, r * 0.45)
        return [(cx + q * np.cos(a), cy + 0.1 * r + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None,
                width: int = 0) -> None:
    pts = shape_points(shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """(size, size) bool mask of one shape (also the template used by the evaluator)."""
    img = Image.new("L", (size * _SS, size * _SS), 0)
    _draw_shape(ImageDraw.Draw(img), shape, cx * _SS, cy * _SS, r * _SS, fill=255)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX)) >= 128


def _background(color: str, pattern: str) -> np.ndarray:
    """(S, S, 3) float background at the supersampled resolution."""
    n = SIZE * _SS
    base = np.array(COLORS[color], dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n] / _SS  # pixel coordinates at 64×64 scale
    if pattern == "plain":
        on = np.zeros((n, n), bool)
    elif pattern == "striped":
        on = ((xx + yy) % 8) < 3
    elif pattern == "dotted":
        on = ((xx % 8 - 4) ** 2 + (yy % 8 - 4) ** 2) < 2.0**2
    elif pattern == "checkered":
        on = ((xx // 8 + yy // 8) % 2) == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; patterns: {', '.join(PATTERNS)}")
    return np.where(on[..., None], base * PATTERN_SHADE, base)


def render(scene: Scene, jitter: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``; returns the (64, 64, 3) uint8 image and (n, 64, 64) bool object masks."""
    n = SIZE * _SS
    canvas = _background(scene.background, scene.pattern)  # (n, n, 3)
    jitter = np.zeros((len(scene.objects), 2)) if jitter is None else jitter
    yy, xx = np.mgrid[0:n, 0:n] / n
    masks = []
    for obj, (jx, jy) in zip(scene.objects, jitter, strict=True):
        ax, ay = ANCHORS[obj.position]
        cx, cy, r = (ax + jx) * _SS, (ay + jy) * _SS, RADIUS[obj.size] * _SS
        m = Image.new("L", (n, n), 0)
        _draw_shape(ImageDraw.Draw(m), obj.shape, cx, cy, r, fill=255)
        inside = np.asarray(m) > 0
        color = np.array(COLORS[obj.color], dtype=np.float32)
        fill = np.broadcast_to(color, (n, n, 3))
        if scene.style == "shaded":
            t = np.clip(((xx * n - (cx - r)) + (yy * n - (cy - r))) / (4 * r), 0, 1)  # 0 top-left → 1
            fill = color * (SHADE_RANGE[0] + (SHADE_RANGE[1] - SHADE_RANGE[0]) * t)[..., None]
        canvas = np.where(inside[..., None], fill, canvas)
        if scene.style == "outlined":
            o = Image.new("L", (n, n), 0)
            _draw_shape(ImageDraw.Draw(o), obj.shape, cx, cy, r, fill=None, outline=255, width=2 * _SS)
            canvas = np.where((np.asarray(o) > 0)[..., None], 20.0, canvas)
        masks.append(m)
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BOX)
    mask_arr = np.stack([np.asarray(m.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128 for m in masks])
    return np.asarray(image), mask_arr

"""Procedural shapes dataset with ground truth: the images the toy model is trained and measured on.

Every image is 64×64 RGB and holds objects on a patterned background. A seed fixes everything, so
an image comes with its caption, per-object masks, boxes and attributes. Two kinds of scene:

* anchored (``sample(seed)``, the shipped model's original data): one or two objects at five anchors,
  two fixed sizes;
* free layout (``sample_layout(seed)``): one to three objects anywhere in the image, of any size
  (radius = half the box side drawn uniformly from ``LAYOUT_RADIUS``), not overlapping (boxes at
  least ``LAYOUT_GAP`` px apart), and with probability ``SAME_SHAPE_P`` all of the same shape but of
  different colours ("a large red square, a small blue square"). Their captions have no place clause;
  the size word is "large" when the radius is at least ``LARGE_FROM`` px, else "small".

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

    caption    := object [", " object [", " object]] [", " background] [", " style]
    object     := "a " SIZE " " COLOR " " SHAPE [" " PLACE]
    PLACE      := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    background := "on a " PATTERN " " COLOR " background"
    style      := STYLE " style"

e.g. ``"a large red circle on the left, a small blue star on the right, on a striped yellow
background, outlined style"`` (anchored) or ``"a large red circle, a small blue square, on a striped
yellow background, outlined style"`` (free layout). Two anchored objects are always on opposite sides
(left/right or top/bottom); all objects of a scene have different colours, and differ from the
background. ``caption(scene)`` writes the full form; training also drops the background, style or
place clauses now and then (``caption(scene, background=False, place=False)``) so short prompts work.
``parse_caption`` reads any caption of the grammar back into attributes (``None`` where a clause is
absent, ``position=None`` for an object without PLACE); ``check_prompt`` rejects words outside
``vocabulary()``.

Token length: every word and every comma is one token of the toy tokenizer, plus BOS and EOS. The
longest caption the generators write is 26 tokens (two anchored objects with places, background and
style; three free objects with background and style: 25), within the text encoder's 32
(``caption_tokens``). Three objects that all name their place would be 34 and be truncated: no
generator writes that.

Boxes: ``Sample.boxes`` / ``object_boxes`` give each object's box as normalised (x0, y0, x1, y1),
top-left origin: the square of half-side r (the radius the shape was drawn with) around its centre;
every shape lies inside its box.
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
# free layouts (sample_layout)
MAX_OBJECTS = 3
LAYOUT_RADIUS = (5.0, 13.0)  # radius (half the box side, px) drawn uniformly from this range
LARGE_FROM = 9.0  # a free object is "large" from this radius on (between the anchored sizes 7 and 11)
LAYOUT_GAP = 2.0  # px between the boxes of two free objects (so every mask is clean)
LAYOUT_MARGIN = 1.0  # px between a free object's box and the image edge
SAME_SHAPE_P = 0.3  # probability that all objects of a 2- or 3-object free layout share one shape
MAX_TOKENS = 32  # the text encoder's positions (BOS and EOS included)
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
PATTERN_SHADE = 0.65  # pattern colour = background colour × this
SHADE_RANGE = (1.0, 0.6)  # shaded style: fill multiplier at the top-left / bottom-right corner
_FILLER = ("a", "on", "the", "at", "in", "background", "style")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str | None  # one of POSITIONS; None for a free-layout object (its place: Scene.geometry)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str  # colour name
    pattern: str
    style: str
    # free layouts: (cx, cy, r) in pixels per object (centre, half the box side); None: anchored
    geometry: tuple[tuple[float, float, float], ...] | None = None


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    masks: np.ndarray  # (n_objects, 64, 64) bool, visible pixels of each object
    scene: Scene
    caption: str
    boxes: np.ndarray  # (n_objects, 4) float: normalised x0, y0, x1, y1 (top-left origin) of each object's box


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
    return Sample(image, masks, scene, caption(scene), object_boxes(scene, jitter))


def size_word(radius: float) -> str:
    """The caption's size word for a free object of this radius (half its box side, px)."""
    return "large" if radius >= LARGE_FROM else "small"


def _apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    """Whether the boxes of (cx, cy, r) ``a`` and ``b`` are at least ``gap`` px apart along x or y."""
    return abs(a[0] - b[0]) >= a[2] + b[2] + gap or abs(a[1] - b[1]) >= a[2] + b[2] + gap


def random_layout(rng: np.random.Generator, n: int) -> tuple[tuple[float, float, float], ...]:
    """``n`` non-overlapping (cx, cy, r) boxes inside the image (rejection sampling; deterministic in ``rng``)."""
    lo, hi = LAYOUT_RADIUS
    while True:
        boxes: list[tuple[float, float, float]] = []
        for _ in range(100):
            r = float(rng.uniform(lo, hi))
            cx, cy = (float(v) for v in rng.uniform(r + LAYOUT_MARGIN, SIZE - r - LAYOUT_MARGIN, size=2))
            if all(_apart((cx, cy, r), b, LAYOUT_GAP) for b in boxes):
                boxes.append((cx, cy, r))
                if len(boxes) == n:
                    return tuple(boxes)


def random_layout_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A free-layout scene: 1–3 objects (uniform), anywhere, any radius in ``LAYOUT_RADIUS``, no place words."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be 1 to {MAX_OBJECTS}, got {n}")
    if n > 1 and rng.random() < SAME_SHAPE_P:
        shapes = [SHAPES[rng.integers(len(SHAPES))]] * n
    else:
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
    names = list(COLORS)
    colors = [names[i] for i in rng.permutation(len(names))[: n + 1]]  # all distinct
    geometry = random_layout(rng, n)
    objects = tuple(Obj(shapes[i], colors[i], size_word(geometry[i][2]), None) for i in range(n))
    return Scene(objects, colors[n], PATTERNS[rng.integers(len(PATTERNS))], STYLES[rng.integers(len(STYLES))],
                 geometry)


def layout_rng(seed: int) -> np.random.Generator:
    """The random stream of free layout ``seed`` (independent of ``sample(seed)``'s)."""
    return np.random.default_rng([seed, 1])


def sample_layout(seed: int, n_objects: int | None = None) -> Sample:
    """A free-layout image with its masks, scene, boxes and caption (no place clause), from ``seed``."""
    scene = random_layout_scene(layout_rng(seed), n_objects)
    image, masks = render(scene)
    return Sample(image, masks, scene, caption(scene), object_boxes(scene))


def object_boxes(scene: Scene | Parsed, jitter: np.ndarray | None = None) -> np.ndarray:
    """(n, 4) float32 boxes, normalised (x0, y0, x1, y1), top-left origin: each object's drawing box
    (centre ± radius). Anchored objects: anchor + ``jitter`` (as ``render``), radius ``RADIUS[size]``."""
    out = np.zeros((len(scene.objects), 4), np.float32)
    for i, (cx, cy, r) in enumerate(_geometry(scene, jitter)):
        out[i] = (cx - r, cy - r, cx + r, cy + r)
    return out / SIZE


def _geometry(scene: Scene | Parsed, jitter: np.ndarray | None = None) -> list[tuple[float, float, float]]:
    """(cx, cy, r) in pixels of every object of ``scene``."""
    geometry = getattr(scene, "geometry", None)
    if geometry is not None:
        return [tuple(g) for g in geometry]
    jitter = np.zeros((len(scene.objects), 2)) if jitter is None else jitter
    out = []
    for obj, (jx, jy) in zip(scene.objects, jitter, strict=True):
        if obj.position is None:
            raise ValueError(f"the {obj.size} {obj.color} {obj.shape} has no place: a scene without place "
                             "words needs its geometry (Scene.geometry) to be drawn")
        ax, ay = ANCHORS[obj.position]
        out.append((ax + jx, ay + jy, RADIUS[obj.size]))
    return out


def caption_tokens(text: str) -> int:
    """Token count of a caption for the toy tokenizer: one per word and per comma, plus BOS and EOS."""
    return len(words_of_with_commas(text)) + 2


def caption(scene: Scene | Parsed, background: bool = True, style: bool = True, place: bool = True) -> str:
    """The scene's caption; ``background``/``style``/``place`` False leave that clause out (``place``: of
    every object; free-layout objects never have one)."""
    parts = [f"a {o.size} {o.color} {o.shape}" + (f" {PLACES[o.position]}" if place and o.position else "")
             for o in scene.objects]
    if background and scene.background is not None:
        parts.append(f"on a {scene.pattern} {scene.background} background")
    if style and scene.style is not None:
        parts.append(f"{scene.style} style")
    return ", ".join(parts)


_OBJ_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    rf"(?: ({'|'.join(PLACES.values())}))?"
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
            if len(objects) == MAX_OBJECTS:
                raise ValueError(f"{text!r} names more than {MAX_OBJECTS} objects; the toy model knows up to "
                                 f"{MAX_OBJECTS}")
            objects.append(Obj(m[3], m[2], m[1], place_to_pos[m[4]] if m[4] else None))
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


def render(scene: Scene | Parsed, jitter: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``; returns the (64, 64, 3) uint8 image and (n, 64, 64) bool object masks. Anchored
    objects sit at their anchor + ``jitter`` (px); free-layout scenes use their ``geometry``."""
    n = SIZE * _SS
    canvas = _background(scene.background, scene.pattern)  # (n, n, 3)
    yy, xx = np.mgrid[0:n, 0:n] / n
    masks = []
    for obj, (gx, gy, gr) in zip(scene.objects, _geometry(scene, jitter), strict=True):
        cx, cy, r = gx * _SS, gy * _SS, gr * _SS
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

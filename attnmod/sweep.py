"""Attention scans and other sweeps (AttnMod paper, Figs. 3-8): the product of a few axes, rendered
in batches, written tile by tile so an interrupted scan resumes where it stopped.

Axes: ``start`` × ``rate`` (× ``accel``) of one schedule, or ``mod``, an explicit list of schedules
(the columns of Figs. 4-5); ``seed``; ``prompt``; ``block`` (each entry a block selector, ``A+B``
modifies both together). The first two axes with several values are the grid's x and y; the rest
make one sheet each. The default tile (multiplier 1, rate 0) is always included and framed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .blocks import list_blocks, resolve_blocks
from .dit import denoiser
from .generate import check_batch, describe, finite, render
from .grid import make_grid
from .grid import side_by_side as grid_side_by_side
from .lock import folder_lock
from .modify import normalize_mods
from .recipe import Recipe, save_png, to_pil, write_image, write_json
from .schedule import Schedule

AXES = ("start", "mod", "rate", "accel", "encoders", "seed", "prompt", "block")
AXIS_TITLES = {"start": "start multiplier", "mod": "AttnMod setting", "rate": "rate per step",
               "accel": "rate change per step", "encoders": "text encoder weights", "seed": "seed",
               "prompt": "prompt", "block": "block"}


def parse_values(text: str, kind=float) -> list:
    """``"a:b:n"`` -> n evenly spaced values from a to b inclusive; ``"v1,v2,..."`` -> that list."""
    text = str(text).strip()
    try:
        if ":" in text:
            a, b, n = text.split(":")
            n = int(n)
            if n < 1:
                raise ValueError
            values = np.linspace(float(a), float(b), n)
            return [kind(round(float(v), 6)) for v in values]
        values = [kind(v) for v in text.split(",") if v.strip() != ""]
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise ValueError(f"malformed range {text!r}: use a:b:n (n values from a to b) or a list v1,v2,...") from None


@dataclass(frozen=True)
class Sweep:
    """What to scan. Every sequence is one axis; the product of all axes is the set of tiles."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    blocks: tuple[str, ...] = ("U1A1A2",)
    starts: tuple[float, ...] = (1.0,)
    rates: tuple[float, ...] = (0.0,)
    accels: tuple[float, ...] = (0.0,)
    settings: tuple[Schedule, ...] | None = None  # replaces start × rate × accel when given
    encoder_weights: tuple[tuple[float, ...], ...] = ()  # SDXL embedding compositions; default always in
    x: str | None = None
    y: str | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("a sweep needs at least one prompt")
        for name in ("seeds", "blocks", "starts", "rates", "accels"):
            if not getattr(self, name):
                raise ValueError(f"sweep axis {name} is empty")
        for name in (self.x, self.y):
            if name is not None and name not in AXES:
                raise ValueError(f"unknown axis {name!r}; choose from {', '.join(AXES)}")

    def axes(self) -> dict[str, list]:
        """Axis name -> values, the default always included (1.0 start, 0.0 rate, neutral setting)."""
        if self.settings is not None:
            tone = [Schedule()] + [s for s in dict.fromkeys(self.settings) if not s.is_neutral]
            sched_axes = {"mod": tone}
        else:
            sched_axes = {
                "start": sorted(set(self.starts) | {1.0}),
                "rate": sorted(set(self.rates) | {0.0}),
                "accel": sorted(set(self.accels) | {0.0}),
            }
        weights = [()] + [tuple(w) for w in dict.fromkeys(self.encoder_weights) if any(v != 1 for v in w)]
        return {**sched_axes, "encoders": weights, "seed": list(dict.fromkeys(self.seeds)),
                "prompt": list(dict.fromkeys(self.prompts)), "block": list(dict.fromkeys(self.blocks))}

    def layout(self) -> tuple[str, str | None, list[str]]:
        """(x axis, y axis, sheet axes)."""
        axes = self.axes()
        active = [a for a in AXES if a in axes and len(axes[a]) > 1]
        x = self.x or (active[0] if active else ("mod" if "mod" in axes else "start"))
        rest = [a for a in active if a != x]
        y = self.y or (rest[0] if rest else None)
        if y == x:
            raise ValueError("x and y must be different axes")
        return x, y, [a for a in rest if a != y]


@dataclass
class Tile:
    recipe: Recipe
    coords: dict  # axis -> value
    path: Path | None = None
    status: str = "pending"  # pending | done | nonfinite
    image: Image.Image | None = None


@dataclass
class ScanResult:
    """The tiles of a sweep (with their images) and its sheets; ``grid(i)`` renders sheet ``i``."""

    sweep: Sweep
    tiles: list[Tile]
    short_names: dict[str, str]
    title: str = ""
    tile_px: int = 128
    pending_count: int = 0  # tiles that needed rendering when the scan started
    rendered: int = 0
    sheet_files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[Tile]:
        return [t for t in self.tiles if t.status == "nonfinite"]

    @property
    def images(self) -> list[Image.Image | None]:
        return [self.image(t) for t in self.tiles]

    def image(self, tile: Tile) -> Image.Image | None:
        if tile.image is None and tile.status == "done" and tile.path is not None:
            with Image.open(tile.path) as im:
                tile.image = im.convert("RGB")
        return tile.image

    def sheets(self) -> list[tuple[dict, list[list[Tile]]]]:
        """[(fixed sheet-axis values, rows of tiles)]."""
        x, y, sheet_axes = self.sweep.layout()
        axes = self.sweep.axes()
        by_coords = {_coord_key(t.coords): t for t in self.tiles}
        out = []
        for combo in itertools.product(*(axes[a] for a in sheet_axes)):
            fixed = dict(zip(sheet_axes, combo, strict=True))
            rows = []
            for yv in axes[y] if y else [None]:
                row = []
                for xv in axes[x]:
                    coords = {**fixed, x: xv, **({y: yv} if y else {})}
                    row.append(by_coords[_coord_key(_complete(coords, axes))])
                rows.append(row)
            out.append((fixed, rows))
        return out

    def grid(self, index: int = 0) -> Image.Image:
        x, y, _ = self.sweep.layout()
        fixed, rows = self.sheets()[index]
        axes = self.sweep.axes()
        cells = [[self.image(t) for t in row] for row in rows]
        framed = {(r, c) for r, row in enumerate(rows) for c, t in enumerate(row) if not t.recipe.mods}
        title = "  ·  ".join([self.title] * bool(self.title) + [_label(a, v) for a, v in fixed.items()])
        return make_grid(
            cells, [_value_text(x, v) for v in axes[x]], [_value_text(y, v) for v in axes[y]] if y else [""],
            x_name=AXIS_TITLES[x], y_name=AXIS_TITLES[y] if y else "", title=title,
            framed=framed, tile_px=self.tile_px,
        )


def _complete(coords: dict, axes: dict) -> dict:
    """Fill single-valued axes so coords identify one tile."""
    return {a: coords.get(a, vals[0]) for a, vals in axes.items()}


def _coord_key(coords: dict) -> tuple:
    return tuple(sorted((a, _value_text(a, v) if isinstance(v, Schedule | tuple) else v) for a, v in coords.items()))


def _value_text(axis: str, value) -> str:
    if isinstance(value, Schedule):
        return value.to_text()
    if axis == "encoders":
        return ",".join(f"{w:g}" for w in value) if value else "default"
    if isinstance(value, float):
        return f"{value:g}"
    if axis == "prompt" and len(value) > 28:
        return value[:26] + "…"
    return str(value)


def _label(axis: str, value) -> str:
    return f"{axis} {_value_text(axis, value)}"


def plan(pipe, sweep: Sweep, base: Recipe) -> list[Tile]:
    """One tile per point of the sweep, each with its full recipe."""
    axes = sweep.axes()
    names = list(axes)
    blocks = list_blocks(pipe)
    for group in axes["block"]:
        resolve_blocks(blocks, group)  # unknown names fail here, before anything runs
    tiles = []
    for combo in itertools.product(*(axes[a] for a in names)):
        c = dict(zip(names, combo, strict=True))
        schedule = c["mod"] if "mod" in c else Schedule(c["start"], c["rate"], c["accel"])
        mods = normalize_mods(denoiser(pipe), {c["block"]: schedule}, blocks)
        recipe = replace(base, prompt=c["prompt"], seed=int(c["seed"]), encoder_weights=c["encoders"]).with_mods(mods)
        tiles.append(Tile(recipe, c))
    return tiles


def run_scan(
    pipe,
    sweep: Sweep,
    base: Recipe,
    *,
    out: str | Path | None = None,
    batch_size: int = 8,
    progress: bool | Callable[[int, int], None] = True,
    tile_px: int | None = None,
    title: str = "",
    side_by_side: bool = False,
    on_tiles: Callable[[list[Tile]], None] | None = None,
    executor=None,
    png_compression: int = 6,
) -> ScanResult:
    """Render every tile of ``sweep`` not already on disk under ``out``, in batches of ``batch_size``.

    Tiles go to ``out/tiles/<recipe key>.png`` (written atomically, recipe embedded), the sheets to
    ``out/grid*.png``, and ``out/manifest.json`` lists every tile. Re-running resumes: a tile whose
    file exists with the same recipe is loaded, not recomputed. Tiles whose image is non-finite are
    not written; they are reported in ``ScanResult.failed`` and drawn as crossed placeholders.
    ``progress`` is a tqdm switch or a ``callback(done, total)``. ``side_by_side`` also writes every
    sheet in one row (the paper's Fig. 8: scans of A, B and A+B). ``on_tiles(tiles)`` is called with the
    tiles found on disk when the scan starts, then with each batch's tiles as they finish (status set, image
    on ``tile.image`` or, for resumed tiles, at ``tile.path``): a page shows them as they come.

    Every input is checked before anything is written; then ``out`` is locked for the whole run
    (``attnmod.lock.folder_lock``): a second run on the same folder fails at once with ValueError.
    A tile that cannot be written (disk full, ...) stops the scan with an ``OSError`` naming the file;
    the manifest then lists the tiles written before it.

    ``executor`` renders the batches: ``None`` or ``LocalExecutor()`` renders them here on ``pipe``;
    ``attnmod.distributed.RayExecutor`` sends them to a pool of Ray workers. Planning, resuming and
    writing are the same either way: this process writes every tile, the manifest and the sheets.

    ``png_compression`` is the tiles' zlib level (0-9; 6 is Pillow's default): lossless at every level, 1 writes
    a 1024² tile ~5x faster for ~25 % more bytes (the driver of a large Ray scan writes every tile).
    ``manifest.json`` is rewritten after each batch unless that would take over a tenth of the run (``_Manifest``).
    """
    tiles = check_scan(pipe, sweep, base, batch_size)
    if png_compression not in range(10):
        raise ValueError(f"PNG compression is a zlib level 0-9, got {png_compression!r}")
    short = {b.name: b.short for b in list_blocks(pipe)}
    result = ScanResult(sweep, tiles, short, title=title, tile_px=tile_px or max(128, base.width))
    out = Path(out) if out is not None else None
    with folder_lock(out) if out is not None else nullcontext():
        return _scan(pipe, result, base, out, batch_size, progress, side_by_side, on_tiles, executor,
                     png_compression)


def check_scan(pipe, sweep: Sweep, base: Recipe, batch_size: int = 8) -> list[Tile]:
    """Every check ``run_scan`` makes before it writes anything; the planned tiles."""
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    tiles = plan(pipe, sweep, base)
    check_batch([t.recipe for t in tiles])
    return tiles


def _scan(pipe, result: ScanResult, base: Recipe, out: Path | None, batch_size: int, progress,
          side_by_side: bool, on_tiles: Callable[[list[Tile]], None] | None = None,
          executor=None, png_compression: int = 6) -> ScanResult:
    """Resume or render the tiles of ``result``, then write the sheets and the manifest."""
    tiles, short = result.tiles, result.short_names
    unique: dict[str, list[Tile]] = {}
    for t in tiles:
        unique.setdefault(t.recipe.key, []).append(t)
        if out is not None:
            t.path = out / "tiles" / f"{t.recipe.key}.png"
    pending = [group for group in unique.values() if not _already_done(group[0].path, group[0].recipe)]
    for group in unique.values():
        if group not in pending:
            for t in group:
                t.status = "done"
    result.pending_count = len(pending)
    if on_tiles is not None and len(pending) < len(unique):
        on_tiles([t for t in tiles if t.status == "done"])
    bar = tqdm(total=len(pending), disable=progress is not True, unit="img", desc="scan")
    done = 0
    batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]
    recipes = [[g[0].recipe for g in batch] for batch in batches]
    manifest = _Manifest(out / "manifest.json", result, base) if out is not None else None
    try:
        for index, images in (executor or LocalExecutor()).map(pipe, recipes):
            batch = batches[index]
            ok = finite(images)
            for group, image, good in zip(batch, images, ok, strict=True):
                pil = to_pil(image) if good else None
                if good and out is not None:
                    save_png(pil, group[0].path, group[0].recipe, short, compress_level=png_compression)
                for t in group:
                    t.status, t.image = ("done", pil) if good else ("nonfinite", None)
            done += len(batch)
            result.rendered = done
            if on_tiles is not None:
                on_tiles([t for group in batch for t in group])
            bar.update(len(batch))
            if callable(progress):
                progress(done, len(pending))
            if manifest is not None:
                manifest.maybe_write()
    except BaseException:
        if manifest is not None:  # interrupted, or a tile could not be written: list what is on disk
            with suppress(OSError):  # (the first error is the one to report)
                manifest.write()
        raise
    bar.close()
    if out is not None:
        result.sheet_files = write_sheets(result, out, side_by_side)
        manifest.write()
    return result


class _Manifest:
    """``manifest.json`` of a running scan, rewritten after a batch unless that would make the driver spend more
    than a tenth of its time on it: a scan of every SDXL block lists ~19,000 tiles (~1 s per write)."""

    def __init__(self, path: Path, result: ScanResult, base: Recipe):
        self.path, self.result, self.base = path, result, base
        self.cost = 0.0  # seconds the last write took
        self.written_at = -math.inf

    def maybe_write(self) -> None:
        if time.monotonic() - self.written_at >= 10 * self.cost:
            self.write()

    def write(self) -> None:
        start = time.monotonic()
        write_manifest(self.path, self.result, self.base)
        self.written_at = time.monotonic()
        self.cost = self.written_at - start


class LocalExecutor:
    """Renders a scan's batches one after another on the scan's own pipeline (the default)."""

    def map(self, pipe, batches: Sequence[Sequence[Recipe]],
            work: Callable | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(batch index, images)`` for every batch, as each finishes (here: in order); with ``work``,
        ``(batch index, work(pipe, recipes))`` (``attnmod.strategy.run_strategies``)."""
        for index, recipes in enumerate(batches):
            yield index, (work or render)(pipe, recipes)


def _already_done(path: Path | None, recipe: Recipe) -> bool:
    if path is None or not path.is_file():
        return False
    try:
        if Recipe.from_png(path).key != recipe.key:
            return False
        with Image.open(path) as im:
            im.verify()  # the recipe is read without the pixels: check they are all there too
        return True
    except Exception:  # unreadable, truncated or foreign file: render it again (it is replaced atomically)
        return False


def write_sheets(result: ScanResult, out: Path, side_by_side: bool = False) -> list[Path]:
    """One PNG per sheet; with ``side_by_side`` also all sheets in one row (``grid-side-by-side.png``)."""
    sheets = result.sheets()
    files = []
    if side_by_side and len(sheets) > 1:
        row = grid_side_by_side([result.grid(i) for i in range(len(sheets))])
        files.append(write_image(out / "grid-side-by-side.png", row))
    for i, (fixed, _) in enumerate(sheets):
        suffix = "" if len(sheets) == 1 else f"-{i:02d}-" + "-".join(_slug(_label(a, v)) for a, v in fixed.items())
        path = out / f"grid{suffix}.png"
        grid = result.grid(i)
        write_image(path, grid)
        files.append(path)
    return files


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in text)[:40]


def write_manifest(path: Path, result: ScanResult, base: Recipe) -> None:
    x, y, sheet_axes = result.sweep.layout()
    write_json(path, {
        "base": base.to_dict(),
        "layout": {"x": x, "y": y, "sheets": sheet_axes},
        "sheets": [str(p.name) for p in result.sheet_files],
        "tiles": [{
            "file": str(t.path.relative_to(path.parent)) if t.path else None,
            "status": t.status,
            "coords": {a: (_value_text(a, v) if isinstance(v, Schedule | tuple) else v) for a, v in t.coords.items()},
            "recipe": t.recipe.to_dict(),
            "summary": describe(t.recipe, result.short_names),
        } for t in result.tiles],
    })

"""A scan as the page shows it: the planned tiles in sheet order (the CLI sheets' layout: x across, y down,
one sheet after another), each tile's caption, and which tiles are finished. No rendering happens here."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..grid import FRAME
from ..recipe import Recipe
from ..schedule import Schedule
from ..sweep import AXIS_TITLES, ScanResult, Sweep, Tile, _value_text

PENDING = (225, 225, 225)


@dataclass
class Cell:
    tile: Tile
    caption: str
    sheet: int


@dataclass
class ScanView:
    sweep: Sweep
    base: Recipe
    folder: Path
    command: str
    cells: list[Cell]
    x: str
    y: str | None
    columns: int
    header: str
    status: dict[str, str] = field(default_factory=dict)  # recipe key -> done | nonfinite
    selected: int | None = None

    @classmethod
    def plan(cls, sweep: Sweep, base: Recipe, tiles: list[Tile], short: dict[str, str], folder: Path,
             command: str) -> ScanView:
        result = ScanResult(sweep, tiles, short)
        x, y, _ = sweep.layout()
        axes = sweep.axes()
        cells = []
        for i, (fixed, rows) in enumerate(result.sheets()):
            for row in rows:
                for t in row:
                    coords = {**fixed, x: t.coords[x], **({y: t.coords[y]} if y else {})}
                    caption = " · ".join(f"{a} {_value_text(a, v)}" for a, v in coords.items())
                    cells.append(Cell(t, "default · " + caption if not t.recipe.mods else caption, i))
        header = f"**x: {AXIS_TITLES[x]}** → {' · '.join(_value_text(x, v) for v in axes[x])}"
        if y:
            header += f"  \n**y: {AXIS_TITLES[y]}** ↓ {' · '.join(_value_text(y, v) for v in axes[y])}"
        return cls(sweep, base, folder, command, cells, x, y, len(axes[x]), header)

    def path(self, cell: Cell) -> Path:
        return self.folder / "tiles" / f"{cell.tile.recipe.key}.png"

    def finish(self, keys_status: list[tuple[str, str]]) -> None:
        self.status.update(keys_status)

    @property
    def done_count(self) -> int:
        return len(self.status)

    @property
    def total(self) -> int:
        return len({c.tile.recipe.key for c in self.cells})

    def gallery(self, display: Path, tile_px: int = 128) -> list[tuple[str, str]]:
        """(image file, caption) per cell: the tile's own file, a framed copy for the default tile, a grey
        placeholder while pending. The page's extra images are written once under ``display`` (not into the
        scan's folder), so every update names files that do not change while the browser loads them."""
        items = []
        for cell in self.cells:
            status = self.status.get(cell.tile.recipe.key)
            default = not cell.tile.recipe.mods
            if status == "done":
                path = self.path(cell)
                if default:  # framed as on the CLI's sheets
                    path = _once(display / f"default-{cell.tile.recipe.key}.png",
                                 lambda p=path: _framed(_open(p).resize((tile_px, tile_px), Image.NEAREST)))
            else:
                name = ("nonfinite" if status == "nonfinite" else "pending") + ("-default" if default else "")
                path = _once(display / f"{name}.png", lambda s=status, d=default: _placeholder(tile_px, s, d))
            caption = cell.caption + ("" if status == "done" else " · NaN" if status == "nonfinite" else " · …")
            items.append((str(path), caption))
        return items

    def schedule_of(self, cell: Cell) -> Schedule:
        c = cell.tile.coords
        return c["mod"] if "mod" in c else Schedule(c["start"], c["rate"], c["accel"])


def scan_command(model: str, form: dict, folder: Path) -> str:
    """The ``attnmod scan`` command line that makes (or continues) the same scan in the same folder."""
    args = ["attnmod", "scan", "--model", model, "--prompt", form["prompt"]]
    if form.get("negative"):
        args += ["--negative-prompt", form["negative"]]
    args += [f"--seed={form['seed']}"]
    for block in form["blocks"]:
        args += ["--block", block]
    for flag in ("start", "rate"):
        if form.get(flag):
            args.append(f"--{flag}={form[flag]}")
    for setting in form.get("settings") or ():
        args.append(f"--setting={setting}")
    for flag in ("steps", "guidance", "size"):
        if form.get(flag):
            args += [f"--{flag}", str(form[flag])]
    args += ["--out", str(folder)]
    return shlex.join(args)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _framed(image: Image.Image) -> Image.Image:
    ImageDraw.Draw(image).rectangle((0, 0, image.width - 1, image.height - 1), outline=FRAME,
                                    width=max(3, image.width // 32))
    return image


def _placeholder(tile_px: int, status: str | None, default: bool) -> Image.Image:
    image = Image.new("RGB", (tile_px, tile_px), PENDING if status is None else (90, 90, 90))
    if status == "nonfinite":
        ImageDraw.Draw(image).line((0, 0, tile_px, tile_px), fill=(140, 40, 40), width=3)
    return _framed(image) if default else image


def _once(path: Path, make) -> Path:
    """``path``, written by ``make()`` the first time only."""
    if not path.is_file():
        from ..recipe import write_image

        write_image(path, make())
    return path

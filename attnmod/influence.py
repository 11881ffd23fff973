"""Block influence map: every block's tile at one AttnMod setting next to the default, with a score.

SD1.5 has 32 attention blocks and SDXL 140 — too many to scan by hand. One sheet shows, for a prompt
and seed, what a given setting does at each block, so users find the blocks worth a full scan. The
score is the mean absolute pixel change from the default image (0..1).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .blocks import resolve_blocks
from .grid import make_grid
from .lock import folder_lock
from .recipe import Recipe, write_image, write_json
from .schedule import Schedule
from .sweep import ScanResult, Sweep, check_scan, run_scan

DEFAULT_SETTING = Schedule(-5.0, 0.2)  # |start| > 2 and |rate| >= 0.2: where the paper sees new styles


def pixel_change(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference of two RGB images, in [0, 1]."""
    a = np.asarray(image, dtype=np.float32) / 255
    b = np.asarray(reference, dtype=np.float32) / 255
    return float(np.abs(a - b).mean())


@dataclass
class InfluenceResult:
    scan: ScanResult
    setting: Schedule
    scores: dict[str, float]  # short block name -> pixel change (NaN if the tile was non-finite)

    def ranking(self) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=np.inf))

    def sheet(self, tile_px: int = 128) -> Image.Image:
        """Rows = UNet block (D0, M0, U1, ...) or DiT block (J0, S0, ...), columns = attention within it
        (A0A1, ...) or stream (I, T, I2); 'default' first."""
        tiles = {t.coords["block"]: t for t in self.scan.tiles if t.recipe.mods}
        default = next(t for t in self.scan.tiles if not t.recipe.mods)
        split = [re.match(r"^([DMUJS]\d+)(.*)$", name).groups() for name in self.scores]
        rows = list(dict.fromkeys(r for r, _ in split))
        cols = list(dict.fromkeys(c for _, c in split))
        cells = [[self.scan.image(default)] + [None] * len(cols) for _ in rows]
        captions, blank = {}, set()
        for r, row in enumerate(rows):
            for c, col in enumerate(cols):
                name = row + col
                if name not in tiles:
                    blank.add((r, c + 1))
                    continue
                cells[r][c + 1] = self.scan.image(tiles[name])
                captions[(r, c + 1)] = f"{self.scores[name]:.3f}"
        grid = make_grid(cells, ["default"] + cols, rows, x_name="attention block", y_name="block",
                         title=f"block influence of {self.setting.to_text()} (mean |pixel change| vs default)",
                         framed={(r, 0) for r in range(len(rows))}, tile_px=tile_px, captions=captions,
                         blank=blank)
        return grid


def block_influence(pipe, base: Recipe, setting: Schedule = DEFAULT_SETTING, *, blocks: str = "all",
                    out: str | Path | None = None, batch_size: int = 8, progress=True,
                    executor=None) -> InfluenceResult:
    """Render ``setting`` at each block (one at a time) and the default image; score each block.

    With ``out``, the inputs are checked first, then ``out`` is locked for the whole run (the scan's
    tiles and manifest, ``influence.png`` and ``influence.json``), as ``run_scan`` does; ``executor`` as there
    (``attnmod.distributed.RayExecutor`` renders the tiles on Ray workers)."""
    if setting.is_neutral:
        raise ValueError("the influence map needs a setting that changes something (not 1:0)")
    shorts = [b.short for b in resolve_blocks(pipe, blocks)]
    sweep = Sweep(prompts=(base.prompt,), seeds=(base.seed,), blocks=tuple(shorts), settings=(setting,))
    if out is not None:
        check_scan(pipe, sweep, base, batch_size)  # before the lock makes the folder
    with folder_lock(out) if out is not None else nullcontext():
        return _influence(pipe, sweep, base, setting, Path(out) if out is not None else None, batch_size, progress,
                          executor)


def _influence(pipe, sweep: Sweep, base: Recipe, setting: Schedule, out: Path | None, batch_size: int,
               progress, executor=None) -> InfluenceResult:
    scan = run_scan(pipe, sweep, base, out=out, batch_size=batch_size, progress=progress, executor=executor)
    default = next(t for t in scan.tiles if not t.recipe.mods)
    scores = {}
    for t in scan.tiles:
        if t.recipe.mods:
            image = scan.image(t)
            scores[t.coords["block"]] = float("nan") if image is None else pixel_change(image, scan.image(default))
    result = InfluenceResult(scan, setting, scores)
    if out is not None:
        sheet = result.sheet(tile_px=max(128, base.width))
        write_image(out / "influence.png", sheet)
        write_json(out / "influence.json", {"setting": setting.to_dict(), "base": base.to_dict(),
                                            "ranking": [{"block": b, "change": s} for b, s in result.ranking()]})
    return result

"""Contact sheets: tiles upscaled for display, axis labels with their values, the default tile framed."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

FRAME = (230, 40, 40)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def display_tile(image: Image.Image, tile_px: int) -> Image.Image:
    """Upscale to ``tile_px``: nearest for whole-number factors (crisp pixels), Lanczos otherwise."""
    if image.size == (tile_px, tile_px):
        return image
    whole = tile_px % image.width == 0 and tile_px % image.height == 0
    return image.resize((tile_px, tile_px), Image.NEAREST if whole else Image.LANCZOS)


def _placeholder(tile_px: int, text: str) -> Image.Image:
    im = Image.new("RGB", (tile_px, tile_px), (90, 90, 90))
    draw = ImageDraw.Draw(im)
    draw.line((0, 0, tile_px, tile_px), fill=(140, 40, 40), width=3)
    draw.text((tile_px // 2, tile_px // 2), text, fill=(255, 255, 255), font=_font(max(10, tile_px // 8)), anchor="mm")
    return im


def _geometry(y_labels: Sequence[str], tile_px: int, title: str) -> tuple[int, int, int]:
    """(left margin, top margin, gap) of a sheet drawn by ``make_grid``."""
    small = _font(max(10, tile_px // 11))
    gap = max(2, tile_px // 32)
    left = max(60, max((int(small.getlength(s)) for s in y_labels), default=0) + 20)
    top = 34 + (28 if title else 0) + 22
    return left, top, gap


def cell_box(row: int, col: int, y_labels: Sequence[str], *, tile_px: int = 128,
             title: str = "") -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) of cell (row, col) on a sheet ``make_grid`` drew with these
    ``y_labels``, ``tile_px`` and ``title``: crops one tile back out of a sheet."""
    left, top, gap = _geometry(y_labels, tile_px, title)
    x0, y0 = left + col * (tile_px + gap) + gap, top + row * (tile_px + gap) + gap
    return x0, y0, x0 + tile_px, y0 + tile_px


def make_grid(
    cells: Sequence[Sequence[Image.Image | None]],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_name: str = "",
    y_name: str = "",
    title: str = "",
    framed: set[tuple[int, int]] = frozenset(),
    tile_px: int = 128,
    missing_text: str = "NaN",
    captions: dict[tuple[int, int], str] | None = None,
    blank: set[tuple[int, int]] = frozenset(),
) -> Image.Image:
    """A labelled grid: ``cells[row][col]`` (None draws a crossed placeholder, cells in ``blank`` stay
    empty), ``framed`` (row, col) outlined, ``captions`` drawn on a band at a tile's foot."""
    rows, cols = len(cells), len(cells[0]) if cells else 0
    font = _font(max(11, tile_px // 9))
    small = _font(max(10, tile_px // 11))
    left, top, gap = _geometry(y_labels, tile_px, title)
    width = left + cols * (tile_px + gap) + gap
    height = top + rows * (tile_px + gap) + gap + 8
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((width // 2, 16), title, fill=INK, font=font, anchor="mm")
    if x_name:
        draw.text((left + (width - left) // 2, top - 40), f"{x_name} ->", fill=INK, font=small, anchor="mm")
    if y_name:
        draw.text((8, top - 12), f"{y_name}", fill=INK, font=small, anchor="lm")
    for c, label in enumerate(x_labels):
        draw.text((left + c * (tile_px + gap) + gap + tile_px // 2, top - 14), label, fill=INK, font=small, anchor="mm")
    for r, label in enumerate(y_labels):
        draw.text((left - 8, top + r * (tile_px + gap) + gap + tile_px // 2), label, fill=INK, font=small, anchor="rm")
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            if (r, c) in blank:
                continue
            x0, y0 = left + c * (tile_px + gap) + gap, top + r * (tile_px + gap) + gap
            tile = _placeholder(tile_px, missing_text) if image is None else display_tile(image, tile_px)
            sheet.paste(tile, (x0, y0))
    for (r, c), text in (captions or {}).items():  # a small label on a dark band at the tile's foot
        x0, y0 = left + c * (tile_px + gap) + gap, top + r * (tile_px + gap) + gap
        band = max(12, tile_px // 8)
        draw.rectangle((x0, y0 + tile_px - band, x0 + tile_px - 1, y0 + tile_px - 1), fill=(0, 0, 0))
        draw.text((x0 + 3, y0 + tile_px - band // 2), text, fill=(255, 255, 255), font=small, anchor="lm")
    w = max(3, tile_px // 32)
    for r, c in framed:  # drawn last, inside the tile, so no neighbour covers it
        x0, y0 = left + c * (tile_px + gap) + gap, top + r * (tile_px + gap) + gap
        draw.rectangle((x0, y0, x0 + tile_px - 1, y0 + tile_px - 1), outline=FRAME, width=w)
    return sheet


def side_by_side(sheets: Sequence[Image.Image], gap: int = 24) -> Image.Image:
    """Sheets next to each other, tops aligned (e.g. scans of A, B and A+B: paper Fig. 8)."""
    width = sum(s.width for s in sheets) + gap * (len(sheets) - 1)
    out = Image.new("RGB", (width, max(s.height for s in sheets)), BACKGROUND)
    x = 0
    for sheet in sheets:
        out.paste(sheet, (x, 0))
        x += sheet.width + gap
    return out

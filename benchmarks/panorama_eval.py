"""MultiDiffusion panoramas on the embedded model: does every part of the panorama follow the style reference, and
are the windows' seams visible?

    python benchmarks/panorama_eval.py --sets 8 --width 256 [--json FILE] [--figure FILE]
    python benchmarks/panorama_eval.py --two --sets 8 --width 384        # two references, left and right

Each set: a panorama prompt naming only objects ("a large red circle") and a style reference prompt with a
background and draw style ("a large blue star, on a striped yellow background, outlined style"), the same seed
with and without the reference. Measured from the images alone (the dataset's palette, ``toy.evaluate``):
* agreement — for every 64-pixel tile of the panorama (left to right, not overlapping), whether its background
  colour (the dominant colour of its border) is the reference's, and the histogram intersection of their border
  colour distributions;
* seams — the mean absolute colour difference between adjacent pixel columns, averaged over the columns at the
  windows' edges (where a window starts or ends) against its average over the other columns (a ratio above 1: the
  edges show).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnmod import load_pipeline  # noqa: E402
from attnmod.methods.panorama import PanoramaOptions, StyleRef, panorama  # noqa: E402
from attnmod.toy import dataset  # noqa: E402
from attnmod.toy.evaluate import DEFAULT_GUIDANCE, border_colours, label_pixels  # noqa: E402


def make_sets(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(panorama prompt, reference prompt, reference background colour) per set."""
    rng = random.Random(seed)
    sets = []
    for _ in range(n):
        shape, colour = rng.choice(dataset.SHAPES), rng.choice(list(dataset.COLORS))
        ref_shape = rng.choice(dataset.SHAPES)
        others = [c for c in dataset.COLORS if c != colour]
        ref_colour, background = rng.sample(others, 2)
        pattern, style = rng.choice(dataset.PATTERNS), rng.choice(dataset.STYLES)
        sets.append((f"a large {colour} {shape}",
                     f"a large {ref_colour} {ref_shape}, on a {pattern} {background} background, {style} style",
                     background))
    return sets


def tile_agreement(image: np.ndarray, reference: np.ndarray, tile: int = 64) -> list[tuple[bool, float]]:
    """Per ``tile``-wide column block of ``image``: (same background colour as the reference, histogram
    intersection of their border colours)."""
    ref_bg, ref_hist = border_colours(label_pixels(to_u8(reference)))
    out = []
    for x in range(0, image.shape[1] - tile + 1, tile):
        bg, hist = border_colours(label_pixels(to_u8(image[:, x : x + tile])))
        out.append((bool(bg == ref_bg), float(np.minimum(hist, ref_hist).sum())))
    return out


def seams(image: np.ndarray, windows, factor: int) -> tuple[float, float]:
    """(mean adjacent-column difference at window edges, mean elsewhere); a column's: mean |column j+1 − column j|."""
    diff = np.abs(np.diff(image.astype(np.float32), axis=1)).mean(axis=(0, 2))  # (W - 1,)
    edges = {left * factor - 1 for _, left, _, _ in windows} | {right * factor - 1 for _, _, _, right in windows}
    edges = {e for e in edges if 0 <= e < len(diff)}
    inside = [d for j, d in enumerate(diff) if j not in edges]
    return float(np.mean(diff[sorted(edges)])) if edges else 0.0, float(np.mean(inside))


def two_references(pipe, args) -> int:
    """Per third of each panorama: the share of tiles with the left / right reference's background colour."""
    sets = make_sets(2 * args.sets, args.set_seed)
    thirds = {name: {"left": [], "right": []} for name in ("left third", "middle third", "right third")}
    figure = []
    for i in range(args.sets):
        (prompt, left, _), (_, right, _) = sets[2 * i], sets[2 * i + 1]
        r = panorama(pipe, prompt, args.width, steps=args.steps, guidance=args.guidance, seed=i,
                     references=[StyleRef(left, 1000 + i), StyleRef(right, 2000 + i)])
        colours = [border_colours(label_pixels(to_u8(x)))[0] for x in r.references]
        if colours[0] == colours[1]:
            continue  # the two references came out with one background: nothing to tell apart
        tiles = [border_colours(label_pixels(to_u8(r.image[:, x : x + 64])))[0]
                 for x in range(0, r.image.shape[1] - 63, 64)]
        n = len(tiles)
        for k, colour in enumerate(tiles):
            third = ("left third", "middle third", "right third")[min(2, 3 * k // n)]
            thirds[third]["left"].append(colour == colours[0])
            thirds[third]["right"].append(colour == colours[1])
        figure.append((r.references[0], r.image, r.references[1]))
    results = {t: {side: float(np.mean(v)) if v else None for side, v in d.items()} | {"tiles": len(d["left"])}
               for t, d in thirds.items()}
    print(json.dumps(results))
    print(f"| {args.width}-pixel panorama, {len(figure)} sets | tiles with the left reference's background | "
          "with the right one's |")
    print("|---|---|---|")
    for t, r in results.items():
        print(f"| {t} ({r['tiles']} tiles) | {r['left']:.0%} | {r['right']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if args.figure and figure:
        write_sheet(args.figure, figure)
    return 0


def write_sheet(path: str, rows: list[tuple[np.ndarray, ...]], gap: int = 8) -> None:
    """A PNG with one row per entry, its images side by side (top-aligned, ``gap`` pixels apart)."""
    from PIL import Image

    heights = [max(im.shape[0] for im in row) for row in rows]
    width = max(sum(im.shape[1] + gap for im in row) for row in rows) - gap
    sheet = Image.new("RGB", (width, sum(heights) + gap * (len(rows) - 1)), "white")
    y = 0
    for row, h in zip(rows, heights, strict=True):
        x = 0
        for im in row:
            sheet.paste(Image.fromarray(to_u8(im)), (x, y))
            x += im.shape[1] + gap
        y += h + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def to_u8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--set-seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--two", action="store_true", help="two references, left and right")
    ap.add_argument("--json")
    ap.add_argument("--figure", help="PNG: per set the reference, the panorama without and with it")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.two:
        return two_references(pipe, args)
    f = pipe.vae_scale_factor
    rows, figure = {"plain": [], "shared": []}, []
    seam = {"plain": [], "shared": []}
    for i, (prompt, ref_prompt, _) in enumerate(make_sets(args.sets, args.set_seed)):
        options = PanoramaOptions()
        plain = panorama(pipe, prompt, args.width, steps=args.steps, guidance=args.guidance, seed=i, options=options)
        shared = panorama(pipe, prompt, args.width, steps=args.steps, guidance=args.guidance, seed=i,
                          references=[StyleRef(ref_prompt, 1000 + i)], options=options)
        for name, r in (("plain", plain), ("shared", shared)):
            rows[name] += tile_agreement(r.image, shared.references[0])
            seam[name].append(seams(r.image, r.views, f))
        figure.append((shared.references[0], plain.image, shared.image))
    results = {}
    for name in rows:
        same = [s for s, _ in rows[name]]
        hist = [h for _, h in rows[name]]
        edge = [e for e, _ in seam[name]]
        inside = [n for _, n in seam[name]]
        results[name] = {"tiles": len(same), "background_same": float(np.mean(same)), "histogram": float(np.mean(hist)),
                         "seam_edges": float(np.mean(edge)), "seam_elsewhere": float(np.mean(inside))}
        print(name, json.dumps(results[name]))
    print("| panorama | tiles with the reference's background colour | border colour histogram intersection | "
          "column jump at window edges / elsewhere (ratio) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['background_same']:.0%} | {r['histogram']:.2f} | {r['seam_edges']:.3f} / "
              f"{r['seam_elsewhere']:.3f} (x{r['seam_edges'] / r['seam_elsewhere']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if args.figure and figure:
        write_sheet(args.figure, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
